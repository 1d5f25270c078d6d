"""The exhaustive rank count (``map``, ``mrr``) ranks by exact scores: ranks equal a float64 brute force, do not
depend on block sizes, query batches, the screening precision or the number of processes."""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
import pytest
import torch

from objretrieval import RetrievalEvaluator
from objretrieval.metrics import ranks_exhaustive
from objretrieval.metrics.sharded_ranks import GlobalShard, sharded_relevant_ranks
from objretrieval.search.exact import SearchStats
from objretrieval.search.scoring import prepare
from tests.spawn import run_world

CPU = torch.device("cpu")
METRICS = ("cosine", "ip", "l2")
PRECISIONS = ("float32", "bf16-exact")


def integer_data(n: int = 90, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer rows: float32 products and sums are exact, so for ``ip`` and ``l2`` the exact scores are
    the float64 ones and the many exact ties must fall to the lower index. Rows 1, 8, 15, ... duplicate the
    row before them (tied relevant items)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).float()
    x[1::7] = x[0::7][: len(x[1::7])]
    return x, torch.randint(0, 4, (n,), generator=g)


def near_tie_data(n: int = 64, d: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial rows: the second half equals the first up to the last bit of one coordinate, so scores
    against the two copies differ below float32 resolution and products round them either way (the float32
    product count ranked them differently for different block sizes); plus exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n // 2, d, generator=g)
    twin = base.clone()
    twin[:, 0] = torch.nextafter(twin[:, 0], torch.full_like(twin[:, 0], float("inf")))
    x = torch.cat([base, twin])
    x[5] = x[4]
    return x, torch.arange(n) % 3


def loo_ranks(x: torch.Tensor, y: torch.Tensor, metric: str, **kwargs: Any) -> torch.Tensor:
    return ranks_exhaustive(
        x, y, x, y, metric=metric, exclude=torch.arange(len(x)), device=CPU, **kwargs
    ).ranks


def float64_scores(x: torch.Tensor, g: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, N) float64 scores, higher is better, of the points the search scores (normalised for cosine)."""
    p = prepare(x, metric, CPU).points.double()
    r = prepare(g, metric, CPU).points.double()
    return -(p[:, None] - r[None]).square().sum(-1) if metric == "l2" else p @ r.T


def brute_ranks(
    scores: torch.Tensor, relevant: torch.Tensor, tol: float = 0.0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per query: the 1-based ranks of its relevant items under (score descending, index ascending), and
    whether each rank is unambiguous (no other item within ``tol`` of its score, exact ties aside). Excluded
    items carry -inf scores and are not relevant."""
    out, sure = [], []
    for s, rel in zip(scores, relevant, strict=True):
        order = sorted(range(len(s)), key=lambda j: (-float(s[j]), j))
        pos = torch.empty(len(s), dtype=torch.int64)
        pos[order] = torch.arange(1, len(s) + 1)
        gap = (s[:, None] - s[None]).abs()
        near = ((gap > 0) & (gap <= tol)).any(dim=1)
        kept = rel.nonzero().squeeze(1)
        ranks, by = pos[kept].sort()
        out.append(ranks)
        sure.append(~near[kept][by])
    return out, sure


def assert_ranks_match(got: torch.Tensor, expected: list[torch.Tensor], sure: list[torch.Tensor]) -> int:
    """Every unambiguous brute-force rank appears in ``got``, and each row has as many ranks; returns how many
    ranks were checked."""
    checked = 0
    for row, want, ok in zip(got, expected, sure, strict=True):
        found = row[row > 0]
        assert len(found) == len(want)
        assert set(want[ok].tolist()) <= set(found.tolist())
        if bool(ok.all()):
            assert torch.equal(found, want)
        checked += int(ok.sum())
    return checked


def loo_relevance(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = y[:, None] == y[None]
    same.fill_diagonal_(False)
    return same, torch.eye(len(y), dtype=torch.bool)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_integer_data_equals_float64_brute_force_ties_included(metric: str, precision: str) -> None:
    x, y = integer_data()
    s = float64_scores(x, x, metric)
    same, self_pairs = loo_relevance(y)
    expected, sure = brute_ranks(s.masked_fill(self_pairs, float("-inf")), same)
    got = loo_ranks(x, y, metric, block_size=16, query_block_size=32, precision=precision)
    assert assert_ranks_match(got, expected, sure) == int(same.sum())  # exact data: every rank checked


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_query_gallery_equals_float64_brute_force(metric: str, precision: str) -> None:
    g = torch.Generator().manual_seed(1)
    q, gallery = torch.randn(40, 24, generator=g), torch.randn(150, 24, generator=g)
    gallery[100:120] = gallery[:20]  # duplicates of (relevant) items: exact ties
    ql, gl = torch.randint(0, 5, (40,), generator=g), torch.randint(0, 5, (150,), generator=g)
    got = ranks_exhaustive(
        q, ql, gallery, gl, metric=metric, exclude=None, device=CPU, block_size=33, precision=precision
    ).ranks
    # 1e-5 is far above the exact scores' error (a few float32 ulps) and far below typical gaps
    expected, sure = brute_ranks(float64_scores(q, gallery, metric), ql[:, None] == gl[None], tol=1e-5)
    checked = assert_ranks_match(got, expected, sure)
    assert checked >= 0.9 * int((ql[:, None] == gl[None]).sum())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exclude_with_missing_entries(precision: str) -> None:
    x, y = integer_data(n=60)
    q, ql, g, gl = x[:20], y[:20], x[20:], y[20:]
    exclude = torch.where(torch.arange(20) % 3 == 0, -1, torch.arange(20) * 2)  # -1: nothing excluded
    s = float64_scores(q, g, "ip")
    excluded = torch.zeros_like(s, dtype=torch.bool)
    has = exclude >= 0
    excluded[has.nonzero().squeeze(1), exclude[has]] = True
    expected, sure = brute_ranks(
        s.masked_fill(excluded, float("-inf")), (ql[:, None] == gl[None]) & ~excluded
    )
    got = ranks_exhaustive(
        q, ql, g, gl, metric="ip", exclude=exclude, device=CPU, block_size=7, precision=precision
    ).ranks
    assert assert_ranks_match(got, expected, sure) == sum(len(e) for e in expected)


@pytest.mark.parametrize("metric", METRICS)
def test_ranks_do_not_depend_on_blocks_batches_or_precision(metric: str) -> None:
    # The float32-product count (before exact scores) fails this: its ranks of the last-bit twins changed
    # with block_size / query_block_size on every seed and metric tried.
    x, y = near_tie_data()
    reference = loo_ranks(x, y, metric)
    for block_size, query_block_size in [(1, 64), (5, 3), (17, 64), (64, 1)]:
        for precision in PRECISIONS:
            got = loo_ranks(
                x, y, metric, block_size=block_size, query_block_size=query_block_size, precision=precision
            )
            assert torch.equal(got, reference), (block_size, query_block_size, precision)
    # leave-one-out through `exclude` equals an explicit gallery with the same exclusions
    as_gallery = ranks_exhaustive(
        x, y, [x[:20], x[20:]], y, metric=metric, exclude=torch.arange(len(x)), device=CPU
    ).ranks
    assert torch.equal(as_gallery, reference)


def test_near_ties_rank_by_exact_score_then_index() -> None:
    # Scores tie exactly (float32 products of these rows are exact) between the relevant item 2 and
    # irrelevant items, item 6 duplicates it, and items 4 and 5 sit one ulp above and below: the order is
    # 4, then the ties 0, 1, 2, 3, 6 by index, then 5.
    one = torch.tensor(1.0)
    q = torch.tensor([[1.0, 1.0, 0.0]])
    g = torch.tensor(
        [
            [0.5, 0.5, 0.0],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 1.0, 1.0],
            [0.0, float(torch.nextafter(one, torch.tensor(2.0))), 0.0],
            [0.0, float(torch.nextafter(one, torch.tensor(0.0))), 0.0],
            [0.0, 1.0, 0.0],
        ]
    )
    gallery_labels = torch.tensor([1, 1, 0, 1, 1, 1, 0])
    for precision in PRECISIONS:
        r = ranks_exhaustive(
            q,
            torch.tensor([0]),
            g,
            gallery_labels,
            metric="ip",
            exclude=None,
            device=CPU,
            precision=precision,
        )
        assert r.ranks.tolist() == [[4, 6]], precision


@pytest.mark.parametrize("precision", PRECISIONS)
def test_few_pairs_are_scored_exactly(precision: str) -> None:
    # Relevant items met again are looked up; other pairs are scored exactly only near a relevant item's
    # score: few in float32, and in bfloat16 (whose bound covers many entries of these random rows) the
    # crowded blocks are screened again in float32 first.
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 32, generator=g), torch.randint(0, 10, (300,), generator=g)
    stats = SearchStats()
    got = loo_ranks(x, y, "cosine", block_size=64, precision=precision, stats=stats)
    assert torch.equal(got, loo_ranks(x, y, "cosine"))
    assert stats.screened == 300 * 300
    assert stats.rescored <= 0.005 * stats.screened


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sources_and_label_comparison(tmp_path: Any, precision: str) -> None:
    x, y = near_tie_data(n=40, d=16)
    reference = loo_ranks(x, y, "cosine")
    hierarchical = torch.stack([y, torch.arange(40) % 5], dim=1)
    coarse = ranks_exhaustive(
        x,
        hierarchical,
        x,
        hierarchical,
        metric="cosine",
        exclude=torch.arange(40),
        device=CPU,
        label_comparison_fn=lambda a, b: a[..., 0] == b[..., 0],
        precision=precision,
    )
    assert torch.equal(coarse.ranks, reference)  # relevant = same coarse label = the 1-D labels
    path = tmp_path / "gallery.h5"
    with h5py.File(path, "w") as f:
        f["x"] = x.numpy()
    with h5py.File(path, "r") as f:
        for gallery in (f["x"], [x[:7].numpy(), x[7:]]):
            got = ranks_exhaustive(
                x,
                y,
                gallery,
                y,
                metric="cosine",
                exclude=torch.arange(40),
                device=CPU,
                block_size=9,
                precision=precision,
            )
            assert torch.equal(got.ranks, reference)


def reference_ap_rr(ranks: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    ap = [float((torch.arange(1, len(r) + 1).double() / r).mean()) for r in ranks]
    rr = [1.0 / float(r[0]) for r in ranks]
    return np.array(ap), np.array(rr)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_evaluator_map_mrr_equal_brute_force(metric: str, precision: str) -> None:
    x, y = integer_data(n=70)
    same, self_pairs = loo_relevance(y)
    expected, _ = brute_ranks(float64_scores(x, x, metric).masked_fill(self_pairs, float("-inf")), same)
    ap, rr = reference_ap_rr(expected)
    ev = RetrievalEvaluator(["map", "mrr"], metric=metric, block_size=8, precision=precision)
    result = ev(x, y)
    assert result.metrics["map"] == pytest.approx(ap.mean(), abs=1e-12)
    assert result.metrics["mrr"] == pytest.approx(rr.mean(), abs=1e-12)
    # query/gallery: the first 30 rows against the rest
    q, g, ql, gl = x[:30], x[30:], y[:30], y[30:]
    expected, _ = brute_ranks(float64_scores(q, g, metric), ql[:, None] == gl[None])
    ap, rr = reference_ap_rr(expected)
    result = ev(q, ql, g, gl)
    assert result.metrics["map"] == pytest.approx(ap.mean(), abs=1e-12)
    assert result.metrics["mrr"] == pytest.approx(rr.mean(), abs=1e-12)


@pytest.mark.parametrize(
    ("data", "metric"),
    [(integer_data(n=70), "ip"), (near_tie_data(n=64, d=16), "cosine")],
    ids=["ties", "near"],
)
def test_evaluator_reports_the_exhaustive_count(data: tuple[torch.Tensor, torch.Tensor], metric: str) -> None:
    # map alone: the count screens every (query, gallery) pair, leave-one-out's own pairs included as the kNN
    # counts them, and scores exactly the (near-)ties of relevant items; with ar@4 (a kNN metric) the two
    # searches add up
    x, y = data
    n = len(x)
    stats = SearchStats()
    ranks_exhaustive(
        x, y, x, y, metric=metric, exclude=torch.arange(n), device=CPU, block_size=8, stats=stats
    )
    counted = RetrievalEvaluator(["map"], metric=metric, block_size=8)(x, y).search
    assert counted == stats and stats.queries == n and stats.screened == n * n and stats.rescored > 0
    knn_only = RetrievalEvaluator(["ar@4"], metric=metric, block_size=8)(x, y).search
    both = RetrievalEvaluator(["map", "ar@4"], metric=metric, block_size=8)(x, y).search
    assert knn_only is not None and knn_only.screened == n * n
    assert both is not None and (both.queries, both.screened, both.rescored) == (
        2 * n,
        2 * n * n,
        stats.rescored + knn_only.rescored,
    )
    q, g, ql, gl = x[:25], x[25:], y[:25], y[25:]
    low = RetrievalEvaluator(["mrr"], metric=metric, block_size=8, precision="bf16-exact")(
        q, ql, g, gl
    ).search
    assert low is not None and (low.precision, low.queries, low.screened) == ("bf16-exact", 25, 25 * (n - 25))
    with pytest.raises(TypeError, match="stats must be a SearchStats"):
        ranks_exhaustive(x, y, x, y, metric=metric, exclude=None, device=CPU, stats={})  # type: ignore[arg-type]


def _sharded_worker(rank: int, world: int) -> dict[str, Any]:
    x, y = near_tie_data(n=60, d=32)
    bounds = [len(x) * r // world for r in range(world + 1)]
    ids = torch.arange(bounds[rank], bounds[rank + 1])
    shard = GlobalShard(x[ids], ids, y, torch.arange(len(x)), CPU)
    num_relevant = (y[ids, None] == y[None]).sum(1) - 1
    width = int(((y[:, None] == y[None]).sum(1) - 1).max())  # the same on every rank
    out: dict[str, Any] = {}
    for precision in PRECISIONS:
        stats = SearchStats()
        ranks = sharded_relevant_ranks(
            shard,
            shard,
            num_relevant,
            width,
            leave_one_out=True,
            metric="cosine",
            label_comparison_fn=None,
            device=CPU,
            block_size=7,
            group=None,
            query_block_size=11,
            precision=precision,
            stats=stats,
        )
        out[precision] = ranks.ranks
        out[precision + ":stats"] = stats
    return out


def test_sharded_ranks_equal_one_process() -> None:
    # 3 shards of 20 rows, which blocks of 7 straddle, both precisions (tests/test_metrics_module.py checks
    # map and mrr of RetrievalMetrics, float32, on 2 and 3 processes)
    world = 3
    x, y = near_tie_data(n=60, d=32)
    stats = SearchStats()
    expected = loo_ranks(x, y, "cosine", block_size=7, query_block_size=11, stats=stats)
    results = run_world(_sharded_worker, world)
    for precision in PRECISIONS:
        got = torch.cat([results[r][precision] for r in range(world)])
        assert torch.equal(got, expected), precision
        # each rank counts its own queries and the pairs of its gallery blocks: summed, one process's counts
        # (float32: the same blocks classify the same entries; bfloat16 falls back to float32 per counter)
        per_rank = [results[r][precision + ":stats"] for r in range(world)]
        assert all(s.precision == precision for s in per_rank)
        assert sum(s.queries for s in per_rank) == stats.queries == 60
        assert sum(s.screened for s in per_rank) == stats.screened == 60 * 60
    assert sum(results[r]["float32:stats"].rescored for r in range(world)) == stats.rescored > 0


def test_refuses_unknown_precision_and_overflowing_rows() -> None:
    x, y = integer_data(n=10)
    with pytest.raises(ValueError, match="precision"):
        loo_ranks(x, y, "ip", precision="bf16")
    x[3] = 1e20  # its float32 scores would overflow, and the bounds with them
    with pytest.raises(ValueError, match="queries row 3 has norm"):
        loo_ranks(x, y, "ip")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ranks_equal_cpu() -> None:
    """Exact scores are elementwise float32 operations, the same bits on the GPU; cuBLAS products (TF32 or
    not, bfloat16) only screen."""
    x, y = near_tie_data(n=600, d=96)
    expected = loo_ranks(x, y, "cosine")
    for precision in PRECISIONS:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                got = ranks_exhaustive(
                    x.cuda(),
                    y,
                    x,
                    y,
                    metric="cosine",
                    exclude=torch.arange(len(x)),
                    device=torch.device("cuda"),
                    block_size=128,
                    precision=precision,
                )
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
            assert torch.equal(got.ranks.cpu(), expected), (precision, tf32)
