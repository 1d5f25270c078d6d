"""RetrievalMetrics (nn.Module, torchmetrics protocol) equals RetrievalEvaluator on the same rows: in one
process, and across real gloo processes with uneven shards, sampler-padding duplicates and ties."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from objretrieval.metrics import RetrievalEvaluator, RetrievalResult
from objretrieval.metrics.streaming import RetrievalMetrics
from tests.spawn import run_world

ALL_METRICS = [
    "recall@1",
    "recall@3",
    "precision@1",
    "r_precision",
    "map@r",
    "map",
    "map@5",
    "mrr",
    "mrr@3",
    "ar@4",
    "nmi",
    "ami",
    "f1",
]


def coarse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relevance of (N, 2) labels by their second level (a coarse class)."""
    return a[..., 1] == b[..., 1]


def integer_data(n: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer embeddings around class centres (exact scores, many ties), labels 5c + 2; rows 0 and 1
    share one embedding (an exact tie between two items)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, num_classes, (n,), generator=g)
    centres = torch.randint(-2, 3, (num_classes, dim), generator=g)
    x = (centres[classes] + torch.randint(-1, 2, (n, dim), generator=g)).float()
    x[1] = x[0]
    return x, classes * 5 + 2


def batches(n: int, sizes: tuple[int, ...]) -> list[slice]:
    """Consecutive slices of uneven sizes (cycled) covering range(n)."""
    out, start, i = [], 0, 0
    while start < n:
        out.append(slice(start, min(n, start + sizes[i % len(sizes)])))
        start, i = out[-1].stop, i + 1
    return out


def assert_same(result: RetrievalResult, expected: RetrievalResult) -> None:
    """Bit-identical metric values, per-query values (NaN where undefined) and counts."""
    assert result.metrics == expected.metrics
    assert result.per_query.keys() == expected.per_query.keys()
    for name, values in expected.per_query.items():
        torch.testing.assert_close(result.per_query[name], values, rtol=0, atol=0, equal_nan=True)
    assert (result.num_queries, result.num_without_relevant) == (
        expected.num_queries,
        expected.num_without_relevant,
    )


# -- one process ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leave_one_out", "kwargs"),
    [
        (True, {"metric": "ip"}),
        (True, {"metric": "cosine", "average": "class", "no_relevant": "zero"}),
        (False, {"metric": "l2"}),
        (False, {"metric": "cosine", "average": "class"}),
    ],
)
def test_values_equal_the_evaluator(leave_one_out: bool, kwargs: dict[str, Any]) -> None:
    x, y = integer_data(70, 6, 9, seed=0)
    if kwargs["metric"] == "cosine":
        x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    m = RetrievalMetrics(ALL_METRICS, return_per_query=True, block_size=16, **kwargs)
    evaluator = RetrievalEvaluator(ALL_METRICS, return_per_query=True, block_size=16, **kwargs)
    if leave_one_out:
        for s in batches(len(y), (7, 1, 20)):
            m(x[s], y[s])  # forward is update
        expected = evaluator(x, y)
    else:
        g, gl = integer_data(50, 6, 9, seed=2)
        for s, t in zip(batches(len(y), (13, 4)), batches(len(gl), (9, 2, 30)), strict=False):
            m.update(x[s], y[s], role="query")
            m.update(g[t], gl[t], role="gallery")
        for s in batches(len(y), (13, 4))[len(batches(len(gl), (9, 2, 30))) :]:
            m.update(x[s], y[s], role="query")
        expected = evaluator(x, y, g, gl)
    assert_same(m.compute(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_dtype_evaluates_the_rounded_embeddings(dtype: torch.dtype) -> None:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    y = torch.arange(40) % 6
    m = RetrievalMetrics(["recall@1", "map@r", "map", "nmi"], storage_dtype=dtype)
    for s in batches(40, (11, 5)):
        m.update(x[s], y[s])
    stored = m.state_dict()["_extra_state"]["both"]["embeddings"]
    assert stored.dtype == dtype and torch.equal(stored, x.to(dtype))
    expected = RetrievalEvaluator(["recall@1", "map@r", "map", "nmi"])(x.to(dtype).float(), y)
    assert m.compute().metrics == expected.metrics


def test_reset_forgets_the_rows() -> None:
    x, y = integer_data(30, 4, 5, seed=4)
    m = RetrievalMetrics(["recall@1", "map@r"], metric="ip")
    m.update(x[:20] + 1, y[:20])
    m.reset()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    m.update(x[:, :2], y, role="query")  # another mode and dim are fine after a reset
    m.update(x[:, :2], y, role="gallery")
    assert (
        m.compute().metrics
        == RetrievalEvaluator(["recall@1", "map@r"], metric="ip")(x[:, :2], y, x[:, :2], y).metrics
    )


def test_state_dict_round_trip_resumes_the_evaluation() -> None:
    x, y = integer_data(40, 5, 6, seed=5)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    m = RetrievalMetrics(["recall@1", "map@r", "map"], metric="ip")
    m.update(x[:25], y[:25], idx[:25])
    state = m.state_dict()
    assert set(state) == {"_extra_state"}
    resumed = RetrievalMetrics(["recall@1", "map@r", "map"], metric="ip")
    resumed.load_state_dict(state)
    for module in (m, resumed):
        module.update(x[25:], y[25:], idx[25:])
    order = idx.argsort()
    expected = RetrievalEvaluator(["recall@1", "map@r", "map"], metric="ip")(x[order], y[order])
    assert resumed.compute().metrics == m.compute().metrics == expected.metrics
    with pytest.raises(ValueError, match="not a RetrievalMetrics state"):
        resumed.set_extra_state({"embeddings": x})


def test_to_moves_the_stored_rows_but_keeps_their_dtype() -> None:
    x, y = integer_data(20, 4, 4, seed=6)
    m = RetrievalMetrics(["recall@1"], storage_dtype=torch.float16)
    m.update(x, y)
    m.double()  # a dtype cast of the module does not re-round the stored embeddings
    assert m.state_dict()["_extra_state"]["both"]["embeddings"].dtype == torch.float16
    if torch.cuda.is_available():
        m.to("cuda")
        stored = m.state_dict()["_extra_state"]["both"]
        assert all(t.is_cuda for t in (stored["embeddings"], stored["labels"]))
        m.update(x.cuda(), y.cuda())
        assert m.compute().num_queries == 40


def test_duplicate_indices_count_once_keeping_the_first() -> None:
    x, y = integer_data(30, 4, 5, seed=7)
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(1)) * 3 + 10  # sparse dataset ids
    m = RetrievalMetrics(["recall@1", "r_precision", "map"], metric="ip", return_per_query=True)
    m.update(x[:20], y[:20], idx[:20])
    again = torch.cat([x[15:20] + 7, x[20:]])  # rows 15..19 again, other embeddings: the first ones are kept
    m.update(again, y[15:], idx[15:])
    order = idx.argsort()
    expected = RetrievalEvaluator(["recall@1", "r_precision", "map"], metric="ip", return_per_query=True)
    assert_same(m.compute(), expected(x[order], y[order]))
    m.update(x[:1], y[:1] + 1, idx[:1])
    with pytest.raises(ValueError, match=f"index {int(idx[0])} was given twice with different labels"):
        m.compute()


@pytest.mark.parametrize(
    ("calls", "error", "message"),
    [
        ([((5, 4), {}), ((5, 3), {})], ValueError, "embeddings have dim 3 .* earlier updates had dim 4"),
        ([((5, 4), {"dtype": torch.float64}), ((5, 4), {})], ValueError, "dtype"),
        ([((5, 4), {"nan": True})], ValueError, "embeddings contains NaN"),
        ([((5, 4), {"labels": 4})], ValueError, "labels has 4 entries, expected 5"),
        ([((5, 4), {"labels_float": True})], TypeError, "labels must have an integer dtype"),
        ([((5, 4), {}), ((5, 4), {"role": "query"})], ValueError, "do not mix"),
        ([((5, 4), {"role": "gallery"}), ((5, 4), {"role": "both"})], ValueError, "do not mix"),
        ([((5, 4), {"role": "queries"})], ValueError, "role must be one of"),
        ([((5, 4), {"indices": [0, 1, -2, 3, 4]})], ValueError, "indices must be dataset indices >= 0"),
        ([((5, 4), {"indices": np.full(5, 2**63, np.uint64)})], TypeError, "indices must be integer"),
        ([((5, 4), {"indices": [0.0, 1, 2, 3, 4]})], TypeError, "indices must be integer"),
        ([((5, 4), {"indices": [0, 1, 2]})], ValueError, r"indices must have shape \(5,\)"),
        ([((5, 4), {"indices": [0, 1, 2, 3, 4]}), ((5, 4), {})], ValueError, "indices were given to some"),
        ([((5, 4), {}), ((5, 4), {"indices": [5, 6, 7, 8, 9]})], ValueError, "indices were given to some"),
        ([], ValueError, "compute\\(\\) before any update"),
        ([((5, 4), {"role": "query"})], ValueError, "no gallery rows were stored"),
        ([((5, 4), {"role": "gallery"})], ValueError, "no query rows were stored"),
    ],
)
def test_bad_input_is_refused_by_name(calls, error, message) -> None:
    m = RetrievalMetrics(["recall@1"])
    with pytest.raises(error, match=message):
        for (n, d), options in calls:
            x = torch.randn(n, d, dtype=options.get("dtype", torch.float32))
            if options.get("nan"):
                x[2, 1] = float("nan")
            labels: Any = torch.arange(options.get("labels", n)) % 2
            if options.get("labels_float"):
                labels = labels.float()
            m.update(x, labels, options.get("indices"), role=options.get("role", "both"))
        m.compute()


def test_custom_label_comparison_equals_the_evaluator() -> None:
    x, y = integer_data(40, 5, 8, seed=9)
    labels = torch.stack([y, y % 3], 1)
    names = ["recall@1", "map@r", "map", "mrr@3"]
    m = RetrievalMetrics(names, metric="ip", label_comparison_fn=coarse)
    for s in batches(40, (6, 11)):
        m.update(x[s], labels[s], torch.arange(40)[s])
    expected = RetrievalEvaluator(names, metric="ip", label_comparison_fn=coarse)(x, labels)
    assert m.compute().metrics == expected.metrics
    m.update(x[:1], torch.tensor([[int(y[0]), int(y[0]) % 3 + 1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="index 0 was given twice with different labels"):
        m.compute()
    with pytest.raises(ValueError, match=r"labels rows have shape \(3,\), but earlier updates had \(2,\)"):
        m.update(x[:1], torch.zeros(1, 3, dtype=torch.int64), torch.tensor([50]))


def test_constructor_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        RetrievalMetrics(storage_dtype=torch.int8)
    with pytest.raises(ValueError, match="unknown metric"):
        RetrievalMetrics(["recal@1"])
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        RetrievalMetrics(block_size=0)


def test_torchmetrics_adapter_equals_the_evaluator() -> None:
    torchmetrics = pytest.importorskip("torchmetrics")
    from objretrieval.metrics.torchmetrics_adapter import TorchmetricsRetrieval

    x, y = integer_data(40, 5, 6, seed=8)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    names = ["recall@1", "map@r", "map", "nmi"]
    adapter = RetrievalMetrics(names, metric="ip").as_torchmetrics()
    assert isinstance(adapter, TorchmetricsRetrieval) and isinstance(adapter, torchmetrics.Metric)
    for s in batches(40, (9, 3)):
        assert adapter(x[s], y[s], idx[s]) is None
    adapter.update(x[:4], y[:4], idx[:4])  # repeats count once
    order = idx.argsort()
    expected = RetrievalEvaluator(names, metric="ip")(x[order], y[order])
    values = adapter.compute()
    assert {n: float(v) for n, v in values.items()} == expected.metrics
    adapter.reset()
    adapter.update(x, y, role="query")
    adapter.update(x[:10], y[:10], role="gallery")
    expected = RetrievalEvaluator(names, metric="ip")(x, y, x[:10], y[:10])
    assert {n: float(v) for n, v in adapter.compute().items()} == expected.metrics
    adapter.update(x, y)
    with pytest.raises(ValueError, match="do not mix"):
        adapter.compute()


# -- across processes -----------------------------------------------------------------------------------------

SHARDED_METRICS = ["recall@1", "recall@3", "precision@1", "r_precision", "map@r", "map@5", "mrr@3", "ar@4"]
EXHAUSTIVE = ["map", "mrr"]  # every relevant item's rank: the sharded exact count

#: Noise that makes integer data's exact ties near ties, a few float32 ulps apart: a score rounded in
#: another order (another block shape) flips them, so only a bit-identical computation gives equal values.
NEAR_TIES = 3e-7

#: name -> (RetrievalMetrics arguments, leave-one-out, with indices, noise added to integer data)
CASES: dict[str, tuple[dict[str, Any], bool, bool, float]] = {
    "loo_ip_indices": (
        {"metrics": [*SHARDED_METRICS, *EXHAUSTIVE, "nmi", "f1"], "metric": "ip", "return_per_query": True},
        True,
        True,
        0.0,
    ),
    "loo_l2_arrival": (
        {"metrics": [*SHARDED_METRICS, *EXHAUSTIVE], "metric": "l2", "average": "class", "block_size": 7},
        True,
        False,
        NEAR_TIES,
    ),
    "loo_cosine_idle_rank": (  # the last rank never updates
        {"metrics": [*SHARDED_METRICS, *EXHAUSTIVE], "metric": "cosine", "block_size": 5},
        True,
        True,
        NEAR_TIES,
    ),
    "qg_ip_near_ties": (
        {
            "metrics": [*SHARDED_METRICS, *EXHAUSTIVE],
            "metric": "ip",
            "block_size": 6,
            "return_per_query": True,
        },
        False,
        True,
        NEAR_TIES,
    ),
    "qg_hierarchical": (
        {"metrics": [*EXHAUSTIVE, "recall@2", "map@r"], "metric": "ip", "label_comparison_fn": coarse},
        False,
        True,
        0.0,
    ),
    "qg_cosine_half": (
        {
            "metrics": [*SHARDED_METRICS, *EXHAUSTIVE, "map@10", "ami"],
            "no_relevant": "zero",
            "storage_dtype": torch.float16,
            "return_per_query": True,
        },
        False,
        True,
        0.3,
    ),
}


def shard_updates(
    world: int, seed: int, n: int, with_indices: bool, noise: float
) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]:
    """Each rank's updates: uneven contiguous shards of a permutation (the last rank holds 2 rows); with
    indices, sampler-style padding repeats the last rank's rows on rank 0 (with other embeddings: rank 0's copy
    comes first, so it is kept) and rank 1 repeats its first row."""
    x, y = integer_data(n, 5, 8, seed)
    x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + world))
    step = (n - 2) // (world - 1)
    starts = [r * step for r in range(world - 1)] + [n - 2, n]
    rows = [perm[starts[r] : starts[r + 1]] for r in range(world)]
    if with_indices:
        rows[0] = torch.cat([rows[0], rows[-1]])
        rows[1] = torch.cat([rows[1], rows[1][:1]])
    out = []
    for r, mine in enumerate(rows):
        updates = []
        for s in batches(len(mine), (4 + r, 9)):
            i = mine[s]
            emb = x[i] + (100.0 if r == 0 and s.stop > len(mine) - 2 and with_indices else 0.0)
            updates.append((emb, y[i], (i * 2 + 1) if with_indices else None))
        out.append(updates)
    return out


def reference_rows(updates) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows one process should evaluate: the first occurrence of each index (ranks in order, then
    updates, then rows), ordered by index; without indices every row in that order."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for per_rank in updates:
        for emb, labels, idx in per_rank:
            for j in range(len(labels)):
                key = int(idx[j]) if idx is not None else len(seen)
                seen.setdefault(key, (emb[j], labels[j]))
    keys = sorted(seen)
    return torch.stack([seen[k][0] for k in keys]), torch.stack([seen[k][1] for k in keys])


def case_updates(name: str, world: int):
    _, leave_one_out, with_indices, noise = CASES[name]
    if name == "loo_cosine_idle_rank":
        updates = shard_updates(world, 13, 33, with_indices, noise)
        return {"both": [updates[0] + updates[-1], *updates[1:-1], []]}
    if name == "qg_hierarchical":  # (N, 2) labels: the class and a coarse level that relevance compares
        updates = {
            role: shard_updates(world, seed, 31, with_indices, noise)
            for role, seed in (("query", 14), ("gallery", 15))
        }
        return {
            role: [[(x, torch.stack([y, y % 3], 1), i) for x, y, i in rank_updates] for rank_updates in u]
            for role, u in updates.items()
        }
    if leave_one_out:
        return {"both": shard_updates(world, 10, 41, with_indices, noise)}
    return {
        "query": shard_updates(world, 11, 29, with_indices, noise),
        "gallery": shard_updates(world, 12, 37, with_indices, noise),
    }


def _sharded_worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (kwargs, *_) in CASES.items():
        m = RetrievalMetrics(kwargs["metrics"], **{k: v for k, v in kwargs.items() if k != "metrics"})
        for role, updates in case_updates(name, world).items():
            for emb, labels, idx in updates[rank]:
                m.update(emb, labels, idx, role=role)
        out[name] = m.compute()
    m = RetrievalMetrics(["recall@1"])
    m.update(torch.randn(3, 4), torch.arange(3) % 2, role="query" if rank == 0 else "both")
    try:
        m.compute()
    except ValueError as err:
        out["mixed"] = str(err)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_compute_equals_one_process(world: int) -> None:
    results = run_world(_sharded_worker, world)
    for name, (kwargs, leave_one_out, _, _) in CASES.items():
        options = {k: v for k, v in kwargs.items() if k not in ("metrics", "storage_dtype")}
        evaluator = RetrievalEvaluator(kwargs["metrics"], **options)
        data = {role: reference_rows(u) for role, u in case_updates(name, world).items()}
        if "storage_dtype" in kwargs:
            data = {role: (x.to(kwargs["storage_dtype"]), y) for role, (x, y) in data.items()}
        expected = evaluator(*data["both"]) if leave_one_out else evaluator(*data["query"], *data["gallery"])
        for r in range(world):
            assert_same(results[r][name], expected)
        # each rank reports its share of the searches (the count for map/mrr, the kNN for ar@4): summed, one
        # process's queries and screened pairs
        shares = [s for r in range(world) if (s := results[r][name].search) is not None]
        assert expected.search is not None and all(s.precision == expected.search.precision for s in shares)
        assert sum(s.queries for s in shares) == expected.search.queries, name
        assert sum(s.screened for s in shares) == expected.search.screened, name
    for r in range(world):
        assert "do not mix" in results[r]["mixed"]
