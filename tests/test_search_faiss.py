"""The faiss backend's options object and its missing neighbours, on real faiss indexes (no mocks)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from objretrieval.metrics import RetrievalEvaluator
from objretrieval.search import FaissOptions, Neighbors, knn
from objretrieval.search.topk import sort_by_score_then_index


def clusters(num: int = 6, size: int = 10, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """``num`` tight, well separated clusters of ``size`` points: an IVF index puts each in its own list."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * F.normalize(torch.randn(num, dim, generator=g), dim=1)
    return centres.repeat_interleave(size, 0) + 0.1 * torch.randn(num * size, dim, generator=g)


def sparse_ivf() -> FaissOptions:
    """Six lists of about ten items, one probed: a query finds only its own cluster."""
    return FaissOptions("IVF6,Flat", nprobe=1)


# -- options --------------------------------------------------------------------------------------------------


def test_defaults_and_frozen() -> None:
    options = FaissOptions()
    assert (options.index, options.nprobe, options.ef_search, options.train_size) == (
        "flat",
        None,
        None,
        100_000,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.nprobe = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"index": 3}, TypeError, "FaissOptions.index must be a string"),
        ({"index": " "}, ValueError, "FaissOptions.index must not be empty"),
        ({"index": "flat", "nprobe": 4}, ValueError, "nprobe applies to IVF indexes only"),
        ({"index": "hnsw", "nprobe": 4}, ValueError, "nprobe applies to IVF indexes only"),
        ({"index": "IVF64,Flat", "ef_search": 32}, ValueError, "ef_search applies to HNSW indexes only"),
        ({"index": "ivf", "nprobe": 0}, ValueError, "FaissOptions.nprobe must be >= 1"),
        ({"index": "ivf", "nprobe": 2.0}, TypeError, "FaissOptions.nprobe must be an int"),
        ({"index": "hnsw", "ef_search": True}, TypeError, "FaissOptions.ef_search must be an int"),
        ({"train_size": 0}, ValueError, "FaissOptions.train_size must be >= 1"),
    ],
)
def test_bad_options_are_rejected(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        FaissOptions(**kwargs)


def test_options_need_the_faiss_backend() -> None:
    x = torch.randn(20, 4)
    with pytest.raises(ValueError, match="faiss options were given but backend='torch'"):
        knn(x, x, k=2, faiss=FaissOptions("ivf", nprobe=4))
    with pytest.raises(TypeError, match="faiss must be a FaissOptions or None, got str"):
        knn(x, x, k=2, backend="faiss", faiss="IVF4,Flat")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'nprobe'"):
        knn(x, x, k=2, nprobe=4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="faiss options were given but backend='torch'"):
        RetrievalEvaluator(["recall@1"], faiss=FaissOptions())
    with pytest.raises(ValueError, match="not a valid faiss factory string"):
        knn(x, x, k=2, backend="faiss", faiss=FaissOptions("NoSuchIndex"))


def test_options_reach_faiss() -> None:
    """IVF with every list probed is exact; with one probed list it is not: nprobe is really applied."""
    x = clusters()
    exact = knn(x, x, k=25)
    probed_all = knn(x, x, k=25, backend="faiss", faiss=FaissOptions("IVF6,Flat", nprobe=6))
    assert torch.equal(probed_all.indices, exact.indices)
    with pytest.warns(RuntimeWarning):
        assert knn(x, x, k=25, backend="faiss", faiss=sparse_ivf()).num_missing > 0
    hnsw = knn(x, x, k=5, backend="faiss", faiss=FaissOptions("hnsw", ef_search=64))
    assert torch.equal(hnsw.indices, exact.indices[:, :5])


def test_evaluator_passes_the_options_through() -> None:
    x, labels = clusters(), torch.arange(6).repeat_interleave(10)
    torch_result = RetrievalEvaluator(["recall@1", "map@r"])(x, labels)
    exhaustive = RetrievalEvaluator(
        ["recall@1", "map@r"], backend="faiss", faiss=FaissOptions("IVF6,Flat", nprobe=6)
    )(x, labels)
    assert exhaustive.metrics == pytest.approx(torch_result.metrics)
    evaluator = RetrievalEvaluator(["recall@1"], backend="faiss")
    assert evaluator.faiss == FaissOptions()


# -- missing neighbours ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_missing_neighbours_are_marked_ranked_last_and_reported(metric: str) -> None:
    x = clusters()
    queries = x[::7] + 0.01
    with pytest.warns(RuntimeWarning, match="fewer than k=25 neighbours") as caught:
        found = knn(queries, x, k=25, metric=metric, backend="faiss", faiss=sparse_ivf())
    assert isinstance(found, Neighbors)
    missing = found.missing
    assert missing.shape == (9, 25) and missing.dtype == torch.bool
    assert torch.equal(missing, found.indices == -1)
    assert found.num_missing == int(missing.sum()) > 0
    short = int(missing.any(dim=1).sum())
    assert len(caught) == 1 and f"for {short} of 9 queries" in str(caught[0].message)
    # missing slots come last in every row, with the worst possible score
    assert bool((missing[:, 1:] >= missing[:, :-1]).all())
    worst = math.inf if metric == "l2" else -math.inf
    assert bool((found.scores[missing] == worst).all())
    # what was found has exact scores (a flat IVF index) and exact order: a brute-force check per row
    q, g = queries.double(), x.double()
    if metric == "cosine":
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    truth = (q[:, None] - g[None]).square().sum(-1) if metric == "l2" else q @ g.T
    for row in range(9):
        ids, scores = found.indices[row][~missing[row]], found.scores[row][~missing[row]]
        assert len(set(ids.tolist())) == len(ids)
        torch.testing.assert_close(scores.double(), truth[row, ids], rtol=1e-5, atol=1e-4)
        assert bool(
            (scores[1:] >= scores[:-1]).all() if metric == "l2" else (scores[1:] <= scores[:-1]).all()
        )


def test_missing_neighbours_with_leave_one_out() -> None:
    x = clusters()
    with pytest.warns(RuntimeWarning, match="for 60 of 60 queries"):  # no list holds 21 items
        found = knn(x, k=20, backend="faiss", faiss=sparse_ivf())
    assert not bool((found.indices == torch.arange(60)[:, None]).any())  # each query's own row is excluded
    assert bool((found.missing[:, 1:] >= found.missing[:, :-1]).all())
    assert bool((found.missing.sum(1) >= 1).all())


def test_complete_results_do_not_warn() -> None:
    x = clusters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = knn(x, x, k=5, backend="faiss", faiss=sparse_ivf())
    assert found.num_missing == 0 and not bool(found.missing.any())


def test_missing_entries_sort_after_real_items_tied_at_minus_infinity() -> None:
    inf = float("inf")
    scores = torch.tensor([[-inf, 0.5, -inf, -inf]])
    indices = torch.tensor([[-1, 7, 9, 3]])
    sorted_scores, sorted_indices = sort_by_score_then_index(scores, indices)
    assert sorted_indices.tolist() == [[7, 3, 9, -1]]
    assert np.array_equal(sorted_scores.numpy(), np.array([[0.5, -inf, -inf, -inf]], dtype=np.float32))
