"""progress=None: bars only for long work; True / False as asked."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from objretrieval import RetrievalEvaluator, knn
from objretrieval.descriptors import DINOv2LocalExtractor, extract_to_store
from objretrieval.progress import AUTO_THRESHOLDS, show_progress
from objretrieval.reranking import Shortlist, rerank_revisited, score_shortlist, score_table
from objretrieval.search.pairwise import pairwise_knn, score_candidates
from tests.tiny_models import tiny_dinov2_vit


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


# -- reranking and extraction: (work, its kind, the bar's name and count, the call) ------------------------------

_TABLE = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
_SCORES, _INDICES = _TABLE.sort(dim=1, descending=True)  # the table's own shortlist, best first
_SHORTLIST = Shortlist(_SCORES, _INDICES)
_GND = [{"easy": [int(row[0])], "hard": [int(row[2])], "junk": [int(row[1])]} for row in _INDICES]


@functools.cache
def _extractor() -> DINOv2LocalExtractor:
    return DINOv2LocalExtractor(tiny_dinov2_vit(embed_dim=16, num_heads=1), topk=4)


def _extract(progress: Any, tmp_path: Path) -> None:
    images = [torch.rand(3, 28, 28) for _ in range(3)]
    extract_to_store(_extractor(), images, tmp_path / "local.h5", progress=progress)


CALLS: dict[str, tuple[int, str, str, Callable[[Any, Path], object]]] = {
    # 6 x 4 candidate pairs in chunks of 5: 5 chunks
    "score_candidates": (
        24,
        "scorer_pairs",
        "pairwise: 100%.* 5/5",
        lambda p, _: score_candidates(score_table(_TABLE), _INDICES[:, :4], chunk_size=5, progress=p),
    ),
    "pairwise_knn with candidates": (
        24,
        "scorer_pairs",
        "pairwise: 100%.* 5/5",
        lambda p, _: pairwise_knn(
            score_table(_TABLE), 2, candidates=_INDICES[:, :4], pair_chunk_size=5, progress=p
        ),
    ),
    # 6 x 10 pairs in 2 x 2 blocks
    "pairwise_knn": (
        60,
        "scorer_pairs",
        "pairwise: 100%.* 4/4",
        lambda p, _: pairwise_knn(
            score_table(_TABLE), 2, query_block_size=3, gallery_block_size=5, progress=p
        ),
    ),
    # 6 x 3 shortlisted pairs in chunks of 4: 5 chunks
    "score_shortlist": (
        18,
        "scorer_pairs",
        "pairwise: 100%.* 5/5",
        lambda p, _: score_shortlist(score_table(_TABLE), _SHORTLIST, 3, chunk_size=4, progress=p),
    ),
    # each of the medium and hard runs scores 6 x 3 pairs, in one chunk
    "rerank_revisited": (
        18,
        "scorer_pairs",
        "(pairwise: 100%.* 1/1.*){2}",
        lambda p, _: rerank_revisited(score_table(_TABLE), _SHORTLIST, _GND, top_k=(3,), progress=p),
    ),
    "extract_to_store": (3, "images", "extract: 100%.* 3/3", _extract),
}


@pytest.mark.parametrize("name", CALLS)
def test_reranking_and_extraction_bars(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    work, kind, bar, call = CALLS[name]
    call(True, tmp_path)
    assert re.search(bar, capsys.readouterr().err, re.DOTALL)
    call(False, tmp_path)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(AUTO_THRESHOLDS, kind, work + 1)  # just more work than this call does: quiet
    call(None, tmp_path)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(AUTO_THRESHOLDS, kind, work)  # exactly this call's work: a bar
    call(None, tmp_path)
    assert re.search(bar, capsys.readouterr().err, re.DOTALL)
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        call("yes", tmp_path)
