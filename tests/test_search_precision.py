"""Euclidean distances of nearly coincident points: the search's l2 metric and the losses' PairBatch.distances.

The Gram formula |x|^2 + |y|^2 - 2 x.y cancels for close points (relative error 3.6e-3 at distance 0.0044 in
float32); both paths recompute those pairs from their difference vectors. References are float64 distances
of the same float32 values, computed from differences.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from objretrieval.batch import make_pair_batch
from objretrieval.search import knn
from objretrieval.search.scoring import NEAR_FRACTION, near_pairs, prepare, score_block


def near_duplicates(num_bases: int, copies: int, dim: int, seed: int) -> torch.Tensor:
    """float32 unit vectors, each base followed by ``copies`` perturbations at distances 1e-4 ... 0.3."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(num_bases, dim, generator=g, dtype=torch.float64), dim=1)
    radius = torch.logspace(-4, -0.5, num_bases * copies, dtype=torch.float64)
    radius = radius[torch.randperm(len(radius), generator=g)][:, None]
    step = F.normalize(torch.randn(num_bases * copies, dim, generator=g, dtype=torch.float64), dim=1)
    copies_ = base.repeat_interleave(copies, 0) + radius * step
    return torch.cat([base, copies_]).float()


def true_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) float64 squared distances of the given (float32) values, from differences."""
    return (a.double()[:, None] - b.double()[None]).square().sum(-1)


def rank_by(sq: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries per row, ties by the lower index."""
    order = torch.sort(sq, dim=1, stable=True).indices
    return order[:, :k]


def max_relative_error(values: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((values.double() - truth).abs() / truth).max())


@pytest.mark.parametrize("dim", [16, 256])
def test_l2_search_is_at_least_as_accurate_as_cdist(dim: int) -> None:
    gallery = near_duplicates(40, 6, dim, seed=dim)
    g = torch.Generator().manual_seed(1)
    queries = gallery[::5] + 1e-3 * torch.randn(len(gallery[::5]), dim, generator=g)
    truth = true_sq(queries, gallery)
    found = knn(queries, gallery, k=8, metric="l2", block_size=64)

    ours = max_relative_error(found.scores, truth.gather(1, found.indices))
    cdist = torch.cdist(queries, gallery).square()
    theirs = max_relative_error(cdist.gather(1, found.indices), truth.gather(1, found.indices))
    assert ours <= theirs
    assert ours < 1e-4  # about 10 u / NEAR_FRACTION at worst, for the pairs the Gram formula keeps
    # the distances are spread enough that this precision ranks exactly like float64
    assert torch.equal(found.indices, rank_by(truth, 8))


def test_leave_one_out_l2_search_ranks_near_duplicates_exactly() -> None:
    x = near_duplicates(30, 5, 64, seed=3)
    truth = true_sq(x, x)
    truth.fill_diagonal_(float("inf"))
    found = knn(x, k=5, metric="l2", block_size=32)
    assert torch.equal(found.indices, rank_by(truth, 5))
    assert max_relative_error(found.scores, truth.gather(1, found.indices)) < 1e-4


@pytest.mark.parametrize("offset", [100.0, 0.3])
def test_uncentred_data_is_searched_from_a_central_origin(offset: float) -> None:
    """Far from zero, nearly every pair would cancel; measured from the data's median, only near duplicates do.

    With offset 0.3 the shift itself rounds (coordinates straddle the median): near pairs must still be
    recomputed from the unshifted values.
    """
    x = offset + near_duplicates(30, 4, 32, seed=4)  # spread about 1
    gallery = x
    queries = x[::3] + 1e-3 * torch.randn(len(x[::3]), 32, generator=torch.Generator().manual_seed(0))
    truth = true_sq(queries, gallery)
    for found in (
        knn(queries, gallery, k=6, metric="l2"),
        knn(queries, gallery, k=6, metric="l2", block_size=16),
    ):
        found_truth = truth.gather(1, found.indices)
        best = truth.gather(1, rank_by(truth, 6))
        torch.testing.assert_close(found_truth, best, rtol=1e-4, atol=0.0)  # the right items, up to ties
        assert max_relative_error(found.scores, found_truth) < 1e-4
        near = found_truth < 1e-4
        assert bool(near.any())
        assert max_relative_error(found.scores[near], found_truth[near]) < 1e-6
    cpu = torch.device("cpu")
    q = prepare(queries, "l2", cpu)
    g = prepare(gallery, "l2", cpu, like=q)
    rows, _ = near_pairs(score_block(q, g, "l2"), q.sq_norms, g.sq_norms, negated=True)
    assert rows.numel() < 0.1 * len(queries) * len(gallery)  # from zero, every pair would be near


def test_regression_distance_0_0044() -> None:
    """The reported case: unit vectors 0.0044 apart lost 3.6e-3 relative precision through the Gram matrix."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(64, 512, generator=g, dtype=torch.float64), dim=1)
    y = x + 0.0044 * F.normalize(torch.randn(64, 512, generator=g, dtype=torch.float64), dim=1)
    x, y = x.float(), y.float()
    truth = (x.double() - y.double()).norm(dim=1)
    gram = (x.square().sum(1) + y.square().sum(1) - 2 * (x * y).sum(1)).clamp(min=0).sqrt()
    assert max_relative_error(gram, truth) > 1e-3  # the input does show the cancellation

    searched = torch.stack(
        [knn(x[i : i + 1], y[i : i + 1], k=1, metric="l2").scores[0, 0] for i in range(64)]
    )
    assert max_relative_error(searched.sqrt(), truth) < 1e-6
    distances = make_pair_batch(x, torch.arange(64), ref_emb=y, ref_labels=torch.arange(64), normalize=False)
    assert max_relative_error(distances.distances().diagonal(), truth) < 1e-6


def test_near_pairs_are_exactly_the_close_ones() -> None:
    x = near_duplicates(20, 3, 32, seed=5)
    sq = (x.square().sum(1)[:, None] + x.square().sum(1)[None] - 2 * x @ x.T).double()
    truth = true_sq(x, x)
    norms = x.double().square().sum(1)
    bound = NEAR_FRACTION * (norms[:, None] + norms[None])
    assert not bool(((truth - bound).abs() < 1e-3 * bound).any())  # no pair sits on the boundary
    rows, cols = near_pairs(sq.float(), x.square().sum(1), x.square().sum(1))
    expected = (truth < bound).nonzero(as_tuple=True)
    assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])
    negated = near_pairs(-sq.float(), x.square().sum(1), x.square().sum(1), negated=True)
    assert torch.equal(negated[0], rows) and torch.equal(negated[1], cols)
    far = F.normalize(torch.randn(50, 64), dim=1)
    sq_far = 2 - 2 * far @ far.T
    sq_far.fill_diagonal_(1.0)
    assert near_pairs(sq_far, far.square().sum(1), far.square().sum(1))[0].numel() == 0


# -- PairBatch.distances: values and gradients -----------------------------------------------------------------


def close_batch(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Six unit-scale points: three pairs at distances 1e-4, 3e-3 and 0.05, far from each other."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=1)
    step = F.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=1)
    radius = torch.tensor([1e-4, 3e-3, 5e-2], dtype=torch.float64)[:, None]
    return torch.stack([base, base + radius * step], dim=1).flatten(0, 1).to(dtype)


@pytest.mark.parametrize(("floor", "offset"), [(1e-12, 0.0), (0.0, 1e-8)])
@pytest.mark.parametrize("with_ref", [False, True])
def test_distances_gradcheck_float64(floor: float, offset: float, with_ref: bool) -> None:
    x = close_batch(torch.float64).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    if with_ref:
        far = close_batch(torch.float64, seed=1)[2:4]
        ref = torch.cat([x.detach()[:2] + 2e-4, far]).requires_grad_()  # near pairs across the two sets too

        def fn(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            batch = make_pair_batch(a, labels, ref_emb=r, ref_labels=torch.arange(4), normalize=False)
            return batch.distances(floor, offset)

        assert torch.autograd.gradcheck(fn, (x, ref))
    else:

        def fn_self(a: torch.Tensor) -> torch.Tensor:
            return make_pair_batch(a, labels, normalize=False).distances(floor, offset)

        assert torch.autograd.gradcheck(fn_self, (x,))


@pytest.mark.parametrize(("floor", "offset"), [(1e-12, 0.0), (0.0, 1e-8)])
def test_float32_distances_and_gradients_match_a_float64_difference_reference(
    floor: float, offset: float
) -> None:
    x32 = close_batch(torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    weights = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    x = x32.clone().requires_grad_()
    ours = make_pair_batch(x, labels, normalize=False).distances(floor, offset)
    (ours.double() * weights).sum().backward()

    x64 = x32.double().requires_grad_()
    reference = ((x64[:, None] - x64[None]).square().sum(-1).clamp(min=floor) + offset).sqrt()
    (reference * weights).sum().backward()

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=1e-5, atol=0.0)
    assert x.grad is not None and x64.grad is not None
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-3 * float(x64.grad.abs().max()))


def test_self_pairs_are_exactly_zero_apart_with_no_gradient() -> None:
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    batch = make_pair_batch(x, torch.arange(10).repeat_interleave(4))
    d = batch.distances(floor=0.0, offset=1e-8)
    assert torch.equal(d.diagonal().detach(), torch.full((40,), 1e-4, dtype=torch.float64))
    (grad,) = torch.autograd.grad(d.diagonal().sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
