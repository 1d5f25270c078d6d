"""The torchmetrics adapter of RetrievalMetrics across real gloo processes: torchmetrics' own state sync (list
states concatenated in rank order) gives, on every rank, one process's values on the concatenated updates,
which are the evaluator's and the native sharded module's, bit for bit; uneven and empty ranks, duplicates by
index, both modes, reset and reuse, and bad layouts refused on every rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from objretrieval.metrics import RetrievalEvaluator
from objretrieval.metrics.streaming import RetrievalMetrics
from tests.spawn import run_world
from tests.test_metrics_module import CASES, case_updates, coarse, reference_rows

pytest.importorskip("torchmetrics")

Updates = dict[str, list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]]


def build(name: str) -> RetrievalMetrics:
    kwargs = CASES[name][0]
    return RetrievalMetrics(kwargs["metrics"], **{k: v for k, v in kwargs.items() if k != "metrics"})


def feed(metric: Any, updates: Updates, ranks: list[int]) -> None:
    """The updates of ``ranks``, in rank order, with their roles."""
    for r in ranks:
        for role, per_rank in updates.items():
            for emb, labels, idx in per_rank[r]:
                metric.update(emb, labels, idx, role=role)


def values(adapter: Any) -> dict[str, float]:
    out = adapter.compute()
    assert all(v.dtype == torch.float64 and v.ndim == 0 for v in out.values())
    return {name: float(v) for name, v in out.items()}


def error_of(fn: Any) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


REUSED, OTHER_MODE = "qg_ip_near_ties", "loo_ip_indices"  # the same metric ("ip"), one per mode


def _worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CASES:
        updates = case_updates(name, world)
        native, adapter = build(name), build(name).as_torchmetrics()
        for m in (native, adapter):
            feed(m, updates, [rank])
        out[name] = (native.compute().metrics, values(adapter))
        # more updates after a compute, none on an idle rank: every rank gathers again (no cached value),
        # and the same rows count once by index
        feed(adapter, updates, [rank])
        out[name + ":again"] = values(adapter) if CASES[name][2] else None
    # reset() and reuse in the other mode, then back
    reused = build(REUSED).as_torchmetrics()
    feed(reused, case_updates(REUSED, world), [rank])
    values(reused)
    reused.reset()
    feed(reused, case_updates(OTHER_MODE, world), [rank])
    out["reused:other"] = values(reused)
    reused.reset()
    feed(reused, case_updates(REUSED, world), [rank])
    out["reused"] = values(reused)
    # every rank raises the same error instead of aborting or hanging in the gather
    dims = build("loo_ip_indices").as_torchmetrics()
    dims.update(torch.randn(3, 4 if rank == 0 else 3), torch.arange(3))
    out["dims"] = error_of(dims.compute)
    levels = RetrievalMetrics(["recall@1"], label_comparison_fn=coarse).as_torchmetrics()
    levels.update(torch.randn(3, 4), torch.zeros(3, 2 + rank, dtype=torch.int64))
    out["levels"] = error_of(levels.compute)
    nobody = build("loo_ip_indices").as_torchmetrics()
    out["nobody"] = error_of(nobody.compute)
    modes = build("loo_ip_indices").as_torchmetrics()
    modes.update(torch.randn(3, 4), torch.arange(3), role="query" if rank == 0 else "both")
    out["modes"] = error_of(modes.compute)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_adapter_equals_one_process_and_the_native_module(world: int) -> None:
    from objretrieval.metrics.torchmetrics_adapter import TorchmetricsRetrieval

    results = run_world(_worker, world)
    for name, (kwargs, leave_one_out, _, _) in CASES.items():
        updates = case_updates(name, world)
        one = build(name).as_torchmetrics()
        assert isinstance(one, TorchmetricsRetrieval)
        feed(one, updates, list(range(world)))  # one process, every rank's updates in rank order
        options = {
            k: v for k, v in kwargs.items() if k not in ("metrics", "storage_dtype", "return_per_query")
        }
        data = {role: reference_rows(u) for role, u in updates.items()}
        if "storage_dtype" in kwargs:
            data = {role: (x.to(kwargs["storage_dtype"]), y) for role, (x, y) in data.items()}
        evaluator = RetrievalEvaluator(kwargs["metrics"], **options)
        expected = evaluator(*data["both"]) if leave_one_out else evaluator(*data["query"], *data["gallery"])
        assert values(one) == expected.metrics, name
        for r in range(world):
            native, adapter = results[r][name]
            assert adapter == native == expected.metrics, (name, r)
            assert results[r][name + ":again"] in (None, adapter)
    other = build(REUSED).as_torchmetrics()
    feed(other, case_updates(OTHER_MODE, world), list(range(world)))
    for r in range(world):
        assert results[r]["reused"] == results[r][REUSED][1]
        assert results[r]["reused:other"] == values(other)
        assert "different embedding dim (rank 0: 4, rank 1: 3" in results[r]["dims"]
        assert "different label levels (rank 0: 2, rank 1: 3" in results[r]["levels"]
        assert "before any update() on every rank" in results[r]["nobody"]
        assert "do not mix" in results[r]["modes"]


def test_layout_is_checked_within_one_process() -> None:
    adapter = RetrievalMetrics(["recall@1"]).as_torchmetrics()
    adapter.update(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match=r"embeddings have dim 2 .* earlier updates had dim 3"):
        adapter.update(torch.randn(4, 2), torch.arange(4))
    # float64 rows are refused, not promoted by the concatenation at compute()
    with pytest.raises(ValueError, match=r"dtype torch\.float64"):
        adapter.update(torch.randn(4, 3, dtype=torch.float64), torch.arange(4))
    empty = RetrievalMetrics(["recall@1"]).as_torchmetrics()
    with (
        pytest.warns(UserWarning, match="before the ``update``"),
        pytest.raises(ValueError, match="before any update"),
    ):
        empty.compute()  # torchmetrics warns, then the adapter refuses
