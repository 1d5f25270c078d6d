"""progress=None: bars only for long work; True / False as asked."""

from __future__ import annotations

import pytest
import torch

from objretrieval import RetrievalEvaluator, knn
from objretrieval.progress import AUTO_THRESHOLDS, show_progress


def test_the_rule() -> None:
    assert show_progress(True, 0) and not show_progress(False, 1e30)
    assert not show_progress(None, None)  # unknown size (an iterable gallery): no bar
    for kind, threshold in AUTO_THRESHOLDS.items():
        assert show_progress(None, threshold, kind)  # type: ignore[arg-type]
        assert not show_progress(None, threshold / 2, kind)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        show_progress("yes", 1)  # type: ignore[arg-type]


def test_small_searches_are_quiet_by_default_and_bars_show_when_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = torch.randn(50, 8)
    knn(x, k=3)
    RetrievalEvaluator(["recall@1"])(x, torch.arange(50) % 5)
    assert capsys.readouterr().err == ""
    knn(x, x, k=3, progress=True)
    assert "search" in capsys.readouterr().err  # tqdm's bar, on stderr
