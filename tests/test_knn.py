"""The streaming kNN engine against brute-force references, across metrics, sources, dtypes and backends."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from objretrieval.search import FaissOptions, knn

METRICS = ["cosine", "ip", "l2"]


def brute_force(
    queries: np.ndarray, gallery: np.ndarray, k: int, metric: str, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference: full score matrix, rows ordered by (better score, lower index)."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    if metric == "l2":
        scores = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
        order_key = scores
    else:
        scores = q @ g.T
        order_key = -scores
    if exclude is not None:
        for i, e in enumerate(exclude):
            if e >= 0:
                order_key[i, e] = np.inf
    idx = np.stack([np.lexsort((np.arange(g.shape[0]), row))[:k] for row in order_key])
    return np.take_along_axis(scores, idx, 1), idx


def integer_data(n: int, d: int, seed: int, low: int = -2, high: int = 3) -> np.ndarray:
    """Small integers: every dot product and distance is exact in float32, and ties are plentiful."""
    return np.random.default_rng(seed).integers(low, high, size=(n, d)).astype(np.float32)


def assert_valid_order(
    scores: torch.Tensor,
    indices: torch.Tensor,
    queries: np.ndarray,
    gallery: np.ndarray,
    metric: str,
    k: int,
    exclude: np.ndarray | None = None,
    atol: float = 1e-5,
) -> None:
    """For inexact arithmetic: each returned item's true score equals the true j-th best score."""
    ref_scores, _ = brute_force(queries, gallery, k, metric, exclude)
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    got = indices.numpy()
    true = ((q[:, None] - g[got]) ** 2).sum(-1) if metric == "l2" else np.einsum("qd,qkd->qk", q, g[got])
    np.testing.assert_allclose(true, ref_scores, atol=atol)
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=atol, rtol=1e-5)
    if exclude is not None:
        assert not (got == exclude[:, None]).any()
    assert all(len(set(row)) == k for row in got.tolist())


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("self_search", [False, True])
def test_exact_indices_and_ties_on_integer_data(metric: str, self_search: bool) -> None:
    queries = integer_data(37, 6, seed=1)
    gallery = queries if self_search else integer_data(101, 6, seed=2)
    exclude = np.arange(37) if self_search else None
    ref_scores, ref_idx = brute_force(queries, gallery, 9, metric, exclude)
    for block_size in (1, 4, 7, 64, 1000):
        got = knn(
            torch.from_numpy(queries),
            None if self_search else torch.from_numpy(gallery),
            k=9,
            metric=metric,
            block_size=block_size,
            query_block_size=5,
        )
        assert torch.equal(got.indices, torch.from_numpy(ref_idx)), f"block_size={block_size}"
        assert torch.equal(got.scores.double(), torch.from_numpy(ref_scores))


def test_ties_prefer_the_lower_index_across_blocks() -> None:
    gallery = torch.zeros(50, 4)
    gallery[:, 0] = 1.0  # every gallery item is identical
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    for block_size in (1, 3, 8, 50):
        assert knn(queries, gallery, k=5, block_size=block_size).indices.tolist() == [[0, 1, 2, 3, 4]]
    # duplicates of the query itself in leave-one-out: the copies come out in index order
    x = torch.ones(6, 3)
    assert knn(x, k=5, block_size=2).indices.tolist() == [[j for j in range(6) if j != i] for i in range(6)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("self_search", [False, True])
def test_random_data_matches_brute_force(metric: str, self_search: bool) -> None:
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((150, 24)).astype(np.float32)
    gallery = queries if self_search else rng.standard_normal((333, 24)).astype(np.float32)
    exclude = np.arange(150) if self_search else None
    got = knn(torch.from_numpy(queries), None if self_search else gallery, k=12, metric=metric, block_size=40)
    assert got.scores.dtype == torch.float32 and got.indices.dtype == torch.int64
    assert_valid_order(got.scores, got.indices, queries, gallery, metric, 12, exclude)


def test_explicit_exclusion_matches_leave_one_out() -> None:
    x = torch.randn(90, 8)
    loo = knn(x, k=6, block_size=16)
    explicit = knn(x, x, k=6, exclude=torch.arange(90), block_size=16)
    assert torch.equal(loo.indices, explicit.indices)
    torch.testing.assert_close(loo.scores, explicit.scores)
    partial = torch.full((90,), -1)
    partial[::2] = torch.arange(0, 90, 2)
    got = knn(x, x, k=6, exclude=partial)
    assert torch.equal(got.indices[::2], loo.indices[::2])
    assert (got.indices[1::2, 0] == torch.arange(1, 90, 2)).all()  # not excluded: each finds itself first


def test_gallery_sources_agree(tmp_path) -> None:
    rng = np.random.default_rng(3)
    queries = torch.from_numpy(rng.standard_normal((20, 16)).astype(np.float32))
    gallery = rng.standard_normal((203, 16)).astype(np.float32)
    reference = knn(queries, torch.from_numpy(gallery), k=7, block_size=50)

    memmap = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=gallery.shape)
    memmap[:] = gallery
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_dataset("features", data=gallery, chunks=(32, 16))
    splits = np.split(gallery, [1, 60, 61, 150])  # ragged blocks, one of a single row
    with h5py.File(tmp_path / "g.h5", "r") as f:
        sources = {
            "numpy": gallery,
            "memmap": memmap,
            "h5py": f["features"],
            "list of blocks": list(splits),
            "generator": (torch.from_numpy(b) for b in splits),
        }
        for name, source in sources.items():
            got = knn(queries, source, k=7, block_size=50)
            assert torch.equal(got.indices, reference.indices), name
            torch.testing.assert_close(got.scores, reference.scores, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(64, 300).to(dtype)
    got = knn(x[:10], x, k=5, metric="ip")
    ref = knn(x[:10].float(), x.float(), k=5, metric="ip")
    assert got.scores.dtype == torch.float32
    assert torch.equal(got.indices, ref.indices)
    assert torch.equal(got.scores, ref.scores)


@pytest.mark.parametrize("metric", METRICS)
def test_faiss_flat_agrees_with_torch(metric: str) -> None:
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    gallery = rng.standard_normal((500, 32)).astype(np.float32)
    ours = knn(torch.from_numpy(queries), gallery, k=10, metric=metric)
    theirs = knn(torch.from_numpy(queries), gallery, k=10, metric=metric, backend="faiss")
    assert torch.equal(ours.indices, theirs.indices)
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=1e-5, atol=1e-4)
    loo = knn(torch.from_numpy(gallery), k=10, metric=metric, backend="faiss")
    assert_valid_order(loo.scores, loo.indices, gallery, gallery, metric, 10, np.arange(500), atol=1e-4)


def test_faiss_approximate_indexes() -> None:
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((30, 16))
    gallery = (centers[rng.integers(0, 30, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(np.float32)
    queries = torch.from_numpy(gallery[:50] + 0.05)
    exact = knn(queries, gallery, k=10)
    exhaustive_ivf = knn(queries, gallery, k=10, backend="faiss", faiss=FaissOptions("IVF16,Flat", nprobe=16))
    assert torch.equal(exhaustive_ivf.indices, exact.indices)  # probing every list is exact
    hnsw = knn(queries, gallery, k=10, backend="faiss", faiss=FaissOptions("hnsw", ef_search=64))
    overlap = np.mean(
        [
            len(set(a) & set(b)) / 10
            for a, b in zip(hnsw.indices.tolist(), exact.indices.tolist(), strict=True)
        ]
    )
    assert overlap >= 0.9
    ivf = knn(
        queries,
        iter([gallery[:1500], gallery[1500:]]),
        k=10,
        backend="faiss",
        faiss=FaissOptions("IVF16,Flat", nprobe=4, train_size=1000),
    )  # one-shot iterable: trained on the first rows, read once
    assert ivf.indices.shape == (50, 10)


def test_score_blocks_stay_small() -> None:
    """No allocation grows with N x N: the largest is one (query block x gallery block) score matrix."""
    x = torch.randn(2048, 8)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        knn(x, k=5, block_size=256)
        knn(x, x, k=5, block_size=256, query_block_size=256)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= 256 * 256 * 4 * 2  # one float32 block, with slack for a same-size temporary
    assert largest < 2048 * 2048 * 4 // 16


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: knn(x, x, k=101), "k=101 is larger than the gallery"),
        (lambda x: knn(x, k=100), "larger than the queries minus the excluded query"),
        (lambda x: knn(x, x, k=100, exclude=torch.arange(100)), "minus the excluded item"),
        (lambda x: knn(x, torch.randn(10, 5), k=1), "gallery has dim 5"),
        (lambda x: knn(x[0], x, k=1), "queries must be 2-D"),
        (lambda x: knn(x.long(), x, k=1), "queries must have a floating dtype"),
        (lambda x: knn(x, torch.empty(0, 4), k=1), "gallery is empty"),
        (lambda x: knn(x, [], k=1), "gallery is empty"),
        (lambda x: knn(x, x, k=0), "k must be >= 1"),
        (lambda x: knn(x, x, k=1, metric="euclid"), "metric must be one of"),
        (lambda x: knn(x, x, k=1, backend="annoy"), "backend must be one of"),
        (lambda x: knn(x, x, k=1, exclude=torch.arange(5)), r"exclude must have shape \(100,\)"),
        (lambda x: knn(x, x, k=1, exclude=torch.full((100,), 100)), "exclude holds ids outside"),
        (lambda x: knn(x, k=1, exclude=torch.arange(100)), "exclude cannot be combined with gallery=None"),
        (lambda x: knn(x, iter([x[:3]]), k=4), "k=4 is larger than the gallery"),
        (lambda x: knn(x, "gallery.h5", k=1), "gallery must be a tensor"),
    ],
)
def test_bad_input_is_rejected(call, message: str) -> None:
    x = torch.randn(100, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        call(x)


def test_non_finite_values_are_reported_with_their_row() -> None:
    x = torch.randn(100, 4)
    bad = x.clone()
    bad[77, 2] = float("nan")
    with pytest.raises(ValueError, match="queries contains NaN or inf values"):
        knn(bad, x, k=1)
    with pytest.raises(ValueError, match=r"gallery contains NaN or inf values \(first at row 77\)"):
        knn(x, bad, k=1, block_size=32)
    bad[77, 2] = float("inf")
    with pytest.raises(ValueError, match=r"first at row 77"):
        knn(x, iter([bad[:50], bad[50:]]), k=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_matches_cpu(metric: str) -> None:
    queries = torch.from_numpy(integer_data(64, 12, seed=7))
    gallery = torch.from_numpy(integer_data(999, 12, seed=8))
    cpu = knn(queries, gallery, k=15, metric=metric, block_size=100)
    gpu = knn(queries.cuda(), gallery, k=15, metric=metric, block_size=100)
    assert gpu.indices.is_cuda
    if metric != "cosine":  # integer data: exact on both devices, ties included
        assert torch.equal(gpu.indices.cpu(), cpu.indices)
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-5, atol=1e-4)
    loo = knn(gallery.cuda().half(), k=15, metric=metric)
    assert loo.scores.dtype == torch.float32 and loo.indices.is_cuda
