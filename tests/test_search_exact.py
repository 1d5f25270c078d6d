"""The exact search: screened products, exact scores, and bf16-exact equal to float32 bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from objretrieval import RetrievalEvaluator, knn
from objretrieval.metrics.streaming import RetrievalMetrics
from objretrieval.search.exact import Screen, SearchStats, exact_scores
from objretrieval.search.scoring import prepare

CPU = torch.device("cpu")


def _brute_force(
    q: torch.Tensor, g: torch.Tensor | None, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 top-k with the tie rule (score descending, index ascending), leave-one-out when g is None."""
    qd = q.double()
    gd = qd if g is None else g.double()
    if metric == "cosine":
        qd, gd = F.normalize(qd, dim=1), F.normalize(gd, dim=1)
    s = -torch.cdist(qd, gd).square() if metric == "l2" else qd @ gd.T
    if g is None:
        s.fill_diagonal_(float("-inf"))
    idx = torch.arange(s.shape[1], dtype=torch.float64).expand_as(s)
    order = torch.from_numpy(__import__("numpy").lexsort((idx.numpy(), -s.numpy()), axis=1))[:, :k]
    return s.gather(1, order), order


def _adversarial(n: int, d: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Rows with exact duplicates, near-duplicates one bf16 ulp apart, and near-tied scores."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[1::7] = x[0::7][: len(x[1::7])]  # exact duplicates: ties broken by the lower index
    x[2::7] = x[0::7][: len(x[2::7])] * (1 + 2**-9)  # same direction: equal cosine, near-equal ip
    x[3::11] += 1e-4 * torch.randn(len(x[3::11]), d, generator=g)  # near-ties below bf16 resolution
    return x * scale + offset


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("case", ["plain", "large_norms", "uncentred"])
def test_bf16_exact_equals_float32_bit_for_bit(metric: str, case: str) -> None:
    scale, offset = {"plain": (1.0, 0.0), "large_norms": (1e3, 0.0), "uncentred": (1.0, 40.0)}[case]
    x = _adversarial(301, 24, 0, scale, offset)
    g = _adversarial(517, 24, 1, scale, offset)
    for gallery, k in ((g, 9), (None, 9), (g, 40)):
        ref = knn(x, gallery, k=k, metric=metric, block_size=128)
        stats = SearchStats()
        low = knn(x, gallery, k=k, metric=metric, block_size=128, precision="bf16-exact", stats=stats)
        assert torch.equal(low.indices, ref.indices)
        assert torch.equal(low.scores, ref.scores)
        assert stats.precision == "bf16-exact" and stats.rescored >= x.shape[0] * k


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_exact_search_matches_float64_brute_force(metric: str) -> None:
    x, g = torch.randn(57, 33), torch.randn(203, 33)
    for gallery in (g, None):
        scores, indices = knn(x, gallery, k=11, metric=metric, block_size=64, precision="bf16-exact")
        ref_scores, ref_indices = _brute_force(x, gallery, 11, metric)
        assert torch.equal(indices, ref_indices)
        expected = -ref_scores if metric == "l2" else ref_scores
        torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6)


def test_duplicates_tie_to_the_lower_index_in_both_precisions() -> None:
    base = torch.randn(5, 16)
    g = base.repeat(40, 1)  # every row 40 times: all ties
    q = base[:3]
    for precision in ("float32", "bf16-exact"):
        found = knn(q, g, k=40, block_size=32, precision=precision)
        expected = torch.arange(3)[:, None] + 5 * torch.arange(40)[None, :]
        assert torch.equal(found.indices, expected)
        assert bool((found.scores == found.scores[:, :1]).all())


def test_scores_do_not_depend_on_block_sizes_or_query_batches() -> None:
    x, g = torch.randn(300, 64), torch.randn(1111, 64)
    ref = knn(x, g, k=7)
    for block_size, query_block_size in ((97, 4096), (1111, 13), (5000, 1)):
        other = knn(x, g, k=7, block_size=block_size, query_block_size=query_block_size)
        assert torch.equal(other.scores, ref.scores) and torch.equal(other.indices, ref.indices)
    few = knn(x[:3], g, k=7)  # three queries: other product shapes, the same scores
    assert torch.equal(few.scores, ref.scores[:3]) and torch.equal(few.indices, ref.indices[:3])
    loo = knn(x, k=5)
    assert torch.equal(loo.scores, knn(x, k=5, block_size=41).scores)


def test_exact_scores_are_per_pair_and_accurate() -> None:
    x, y = torch.randn(500, 97), torch.randn(500, 97)
    for metric in ("ip", "l2"):
        s = exact_scores(x, y, metric)
        perm = torch.randperm(500)
        assert torch.equal(exact_scores(x[perm], y[perm], metric), s[perm])  # the batch does not matter
        assert torch.equal(exact_scores(x[:1], y[:1], metric), s[:1])
        ref = (
            -(x.double() - y.double()).square().sum(1) if metric == "l2" else (x.double() * y.double()).sum(1)
        )
        terms = (
            (x.double() - y.double()).square().sum(1)
            if metric == "l2"
            else (x.double() * y.double()).abs().sum(1)
        )
        depth = math.ceil(math.log2(97)) + 2
        assert bool(((s.double() - ref).abs() <= depth * 2**-24 * terms).all())


@pytest.mark.parametrize("precision", ["float32", "bf16-exact"])
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_screening_stays_within_its_bound(precision: str, metric: str) -> None:
    """The rigorous bound: |screened - exact| <= E + r |screened|, on data with large and mixed norms."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(64, 200, generator=g) * torch.logspace(-2, 3, 64)[:, None]
    r = torch.randn(96, 200, generator=g) * torch.logspace(3, -2, 96)[:, None] + 0.5
    screen = Screen(metric, precision)  # type: ignore[arg-type]
    qp = prepare(q, metric, CPU)
    rp = prepare(r, metric, CPU, like=qp)
    qs, rs = screen.rows(qp), screen.rows(rp)
    s = screen.scores(qs, rs).double()
    e, rel = screen.bounds(qs, rs)
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(96), indexing="ij")
    exact = exact_scores(qp.points[rows.flatten()], rp.points[cols.flatten()], metric).double().view(64, 96)
    assert bool(((s - exact).abs() <= e[:, None] + rel * s.abs()).all())


def test_rows_whose_scores_would_overflow_are_refused() -> None:
    x = torch.randn(3, 16) * 1e20  # finite, but |q| |g| and squared distances overflow float32
    for metric in ("ip", "l2"):
        with pytest.raises(ValueError, match=r"queries row 0 has norm .* overflow"):
            knn(x, torch.randn(50, 16), k=3, metric=metric)
    with pytest.raises(ValueError, match="gallery row 7 has norm"):
        big = torch.randn(50, 16)
        big[7] *= 1e20
        knn(torch.randn(3, 16), big, k=3, metric="ip")


def test_bf16_exact_search_is_refused_where_it_does_not_apply() -> None:
    x = torch.randn(20, 8)
    with pytest.raises(ValueError, match="precision"):
        knn(x, k=3, precision="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision='bf16-exact' is an option of our own search"):
        knn(x, x, k=3, backend="faiss", precision="bf16-exact")
    with pytest.raises(ValueError, match="precision"):
        RetrievalEvaluator(["recall@1"], backend="faiss", precision="bf16-exact")
    with pytest.raises(ValueError, match="precision"):
        RetrievalEvaluator(["recall@1"], precision="float16")  # type: ignore[arg-type]


def test_evaluator_and_metrics_module_give_identical_values_in_bf16_exact() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 32, generator=g)
    labels = torch.arange(40).repeat_interleave(6)
    x = centres[labels] + 1.5 * torch.randn(240, 32, generator=g)
    names = ["recall@1", "recall@4", "precision@1", "r_precision", "map@r"]
    ref = RetrievalEvaluator(names)(x, labels)
    low = RetrievalEvaluator(names, precision="bf16-exact")(x, labels)
    assert low.metrics == ref.metrics
    assert low.search is not None and low.search.precision == "bf16-exact"
    assert low.search.rescored >= 240 * 5 and ref.search is not None and ref.search.precision == "float32"
    module = RetrievalMetrics(names, precision="bf16-exact")
    for part in range(0, 240, 70):
        module.update(x[part : part + 70], labels[part : part + 70])
    assert module.compute().metrics == ref.metrics


def kernel_backend_checks() -> None:
    """knn(backend="triton") equals the torch backend bit for bit; run under the Triton interpreter."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(0)
    x, gallery = torch.randn(23, 16, generator=g), torch.randn(150, 16, generator=g)
    gallery[1::3] = gallery[0::3][:50]  # exact ties
    exclude = torch.randint(-1, 150, (23,), generator=g)
    runs = 0
    for metric in ("cosine", "ip", "l2"):
        for precision in ("float32", "bf16-exact"):
            for gal, ex, k in ((gallery, None, 7), (None, None, 7), (gallery, exclude, 60)):
                stats = SearchStats()
                got = knn(
                    x, gal, k=k, metric=metric, exclude=ex, backend="triton", precision=precision, stats=stats
                )
                want = knn(x, gal, k=k, metric=metric, exclude=ex)
                assert torch.equal(got.indices, want.indices), (metric, precision, k)
                assert torch.equal(got.scores, want.scores), (metric, precision, k)
                assert stats.rescored >= x.shape[0] * k
                runs += 1
    base = torch.randn(1, 64, generator=g)  # a row that excludes nothing among near-duplicates (-1)
    near = torch.cat([base * 2, base + 1e-6 * torch.randn(2, 64, generator=g)])
    for precision in ("float32", "bf16-exact"):
        got = knn(base, near, k=2, exclude=torch.tensor([-1]), backend="triton", precision=precision)
        want_near = knn(base, near, k=2, exclude=torch.tensor([-1]))
        assert torch.equal(got.indices, want_near.indices) and torch.equal(got.scores, want_near.scores)
    labels = torch.arange(23) % 5
    names = ["recall@1", "precision@1", "map@r"]
    want = RetrievalEvaluator(names)(x, labels)
    assert RetrievalEvaluator(names, backend="triton")(x, labels).metrics == want.metrics
    g_labels = torch.arange(150) % 5
    against = RetrievalEvaluator(names)(x, labels, gallery, g_labels).metrics
    assert RetrievalEvaluator(names, backend="triton")(x, labels, gallery, g_labels).metrics == against
    module = RetrievalMetrics(names, backend="triton", precision="bf16-exact")
    module.update(x, labels)
    assert module.compute().metrics == want.metrics
    print(f"kernel backend checks passed: {runs + 4}")


def test_kernel_backend_equals_the_torch_backend_under_the_interpreter() -> None:
    from tests.interpreter import run_interpreted

    out = run_interpreted(
        "from tests.test_search_exact import kernel_backend_checks; kernel_backend_checks()"
    )
    assert "kernel backend checks passed: 22" in out


def test_kernel_backend_refuses_what_it_cannot_search(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(10, 4)
    with pytest.raises(TypeError, match="gallery tensor"):
        knn(x, iter([x]), k=2, backend="triton")
    with pytest.raises(ValueError, match="progress"):
        knn(x, x, k=2, backend="triton", progress=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            knn(x, x, k=2, backend="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_cuda_search_equals_cpu_bit_for_bit(metric: str) -> None:
    """Exact scores are elementwise float32 operations: the same bits on the GPU as on the CPU, whatever the
    products (cuBLAS float32 with or without TF32, bfloat16) did."""
    x, g = _adversarial(2000, 96, 0), _adversarial(30000, 96, 1)
    cpu = knn(x, g, k=50, metric=metric)
    for precision in ("float32", "bf16-exact"):
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                found = knn(x.cuda(), g.cuda(), k=50, metric=metric, precision=precision)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
            assert torch.equal(found.indices.cpu(), cpu.indices) and torch.equal(
                found.scores.cpu(), cpu.scores
            )
    loo = knn(x, k=20, metric=metric)
    found = knn(x.cuda(), k=20, metric=metric, precision="bf16-exact", backend="triton")
    assert torch.equal(found.indices.cpu(), loo.indices) and torch.equal(found.scores.cpu(), loo.scores)


@pytest.mark.parametrize("precision", ["float32", "bf16-exact"])
def test_rows_with_fewer_than_k_finite_entries_in_a_block(precision: str) -> None:
    """A block as wide as k, one of whose columns a query excludes: the row's block k-th is -inf (regression:
    a NaN threshold once dropped the whole block)."""
    g = torch.Generator().manual_seed(0)
    x, gallery = torch.randn(6, 8, generator=g), torch.randn(12, 8, generator=g)
    exclude = torch.tensor([0, 1, 2, 3, 4, 7])
    found = knn(x, gallery, k=5, block_size=5, exclude=exclude, precision=precision)
    scores = F.normalize(x.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    scores[torch.arange(6), exclude] = float("-inf")
    assert torch.equal(found.indices, scores.topk(5, dim=1).indices)
    loo = knn(x, k=5, block_size=5, precision=precision)  # the diagonal in a 5-wide first block
    _, ref_indices = _brute_force(x, None, 5, "cosine")
    assert torch.equal(loo.indices, ref_indices)


def test_exact_scores_and_stats_refuse_bad_input() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="pair row by row"):
        exact_scores(x, x[:3], "ip")
    with pytest.raises(ValueError, match="pair row by row"):
        exact_scores(x, torch.randn(10, 5), "ip")
    with pytest.raises(ValueError, match="metric must be one of"):
        exact_scores(x, x, "cos")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32"):
        exact_scores(x.double(), x.double(), "ip")
    with pytest.raises(TypeError, match="stats must be a SearchStats"):
        knn(x, k=2, stats={})  # type: ignore[arg-type]
