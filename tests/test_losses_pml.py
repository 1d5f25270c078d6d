"""Losses and miners against brute-force triplet enumeration and pytorch-metric-learning on the same input:
mined tuples of every kind, reducers, cosine triplets, triplet and multi-similarity mining, proxy logits."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

import objretrieval.losses.triplet as triplet_module
from objretrieval.losses import (
    ContextualLoss,
    ContrastiveLoss,
    MarginLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    TripletMarginLoss,
)
from objretrieval.miners import MinedPairs, MinedTriplets, MultiSimilarityMiner, TripletMarginMiner


def batch(num_classes: int = 4, per_class: int = 5, dim: int = 8, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return x, labels


# -- triplets: brute force over every (anchor, positive, negative) -----------------------------------------


def brute_force_triplet(x, labels, margin, selection, distance="euclidean", reduction="mean_nonzero"):
    """Enumerate every valid triplet; d from explicit differences (or -cos); select; hinge; reduce."""
    f = F.normalize(x, dim=1)
    n = len(labels)
    a, p, q = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
    a, p, q = a.flatten(), p.flatten(), q.flatten()
    valid = (a != p) & (labels[a] == labels[p]) & (labels[a] != labels[q])
    a, p, q = a[valid], p[valid], q[valid]
    if distance == "cosine":
        d_ap, d_an = -(f[a] * f[p]).sum(1), -(f[a] * f[q]).sum(1)
    else:
        d_ap, d_an = (f[a] - f[p]).norm(dim=1), (f[a] - f[q]).norm(dim=1)
    losses = torch.relu(d_ap - d_an + margin)
    selected = {"all": torch.ones_like(d_ap, dtype=torch.bool), "hard": d_an <= d_ap, "semihard": d_ap < d_an}
    losses = losses[selected[selection]]
    if selection != "all":  # a selection keeps only triplets with a positive loss
        losses = losses[losses > 0]
    if reduction == "sum":
        return losses.sum()
    count = (losses > 0).sum() if reduction == "mean_nonzero" else losses.numel()
    return losses.sum() / max(int(count), 1)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("selection", ["all", "hard", "semihard"])
@pytest.mark.parametrize("margin", [-0.1, 0.0, 0.2])
def test_triplet_selection_matches_brute_force_for_every_margin(margin, selection, distance, monkeypatch):
    """Regression: margin < 0 with "hard" gave a negative loss. Both counting paths, several class sizes."""
    # one big class (many positives per anchor) next to small ones, so both paths see both shapes
    y = torch.cat([torch.zeros(9, dtype=torch.long), torch.arange(1, 6).repeat_interleave(3)])
    x = torch.randn(len(y), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[y == 0] += 0.5  # some anchors have hard negatives, some do not
    for reduction in ("mean_nonzero", "mean", "sum"):
        reference_x = x.clone().requires_grad_(True)
        reference = brute_force_triplet(reference_x, y, margin, selection, distance, reduction)
        if reference.requires_grad:
            reference.backward()
        for cap in (0, 10**6):  # 0: sort-based path for every anchor; huge: direct comparison
            monkeypatch.setattr(triplet_module, "_COMPACT_MAX_POSITIVES", cap)
            leaf = x.clone().requires_grad_(True)
            loss = TripletMarginLoss(margin, selection, distance=distance, reduction=reduction)
            impossible = selection == "semihard" and margin <= 0  # no triplet: a zero loss and a warning
            with pytest.warns(RuntimeWarning) if impossible else contextlib.nullcontext():
                value = loss(leaf, y)
            assert value >= 0
            torch.testing.assert_close(value, reference.detach())
            if value.grad_fn is not None and reference.requires_grad:
                value.backward()
                torch.testing.assert_close(leaf.grad, reference_x.grad)


def test_negative_margin_hard_selection_counts_only_violating_triplets() -> None:
    """The issue's case: every hard triplet kept by "hard" must have a positive hinge."""
    x, y = batch(seed=5)
    value = TripletMarginLoss(margin=-0.05, selection="hard")(x, y)
    assert value > 0
    torch.testing.assert_close(value, brute_force_triplet(x, y, -0.05, "hard"))


# -- mined structures of every kind, against PML on the same tuples ---------------------------------------


def mined_variants(x, y):
    """The four shapes a mining reaches a loss in: ours (pairs, triplets) and PML's (4-tuple, 3-tuple)."""
    pml_pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, y)
    pml_triplets = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="hard")(x, y)
    ours_pairs = MultiSimilarityMiner(epsilon=0.1)(x, y)
    ours_triplets = TripletMarginMiner(margin=0.1, selection="semihard")(x, y)
    return {
        "MinedPairs": (ours_pairs, ours_pairs.to_indices()),
        "MinedTriplets": (ours_triplets, tuple(ours_triplets)),
        "pml 4-tuple": (pml_pairs, pml_pairs),
        "pml 3-tuple": (pml_triplets, pml_triplets),
    }


def pml_equivalents(num_classes: int):
    """(ours, PML) pairs of the losses PML has, with the same settings."""
    cosine = pml_distances.CosineSimilarity()
    return {
        "contrastive": (
            ContrastiveLoss(0.9, 0.6),
            pml_losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.6, distance=cosine),
        ),
        "triplet": (TripletMarginLoss(margin=0.1), pml_losses.TripletMarginLoss(margin=0.1)),
        "multi_similarity": (
            MultiSimilarityLoss(2.0, 50.0, 0.5),
            pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5),
        ),
        "margin": (
            MarginLoss(num_classes, margin=0.2, beta=1.2),
            pml_losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=True, num_classes=num_classes),
        ),
    }


@pytest.mark.parametrize("kind", ["MinedPairs", "MinedTriplets", "pml 4-tuple", "pml 3-tuple"])
@pytest.mark.parametrize("name", ["contrastive", "triplet", "multi_similarity", "margin"])
def test_mined_tuples_are_used_as_pml_uses_them(name: str, kind: str) -> None:
    x, y = batch(spread=1.5)
    ours_mined, pml_mined = mined_variants(x, y)[kind]
    ours, pml = pml_equivalents(4)[name]
    expected = pml(x, y, pml_mined)
    got = ours(x, y, ours_mined)
    # MarginLoss: sqrt(||.||^2 + 1e-8) as MIC computes it, against PML's exact distance
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if name == "margin" else {}
    torch.testing.assert_close(got, expected.to(got.dtype), **tolerance)
    without_mining = ours(x, y)
    assert not torch.isclose(got, without_mining), "the mining must change the value"


@pytest.mark.parametrize("kind", ["MinedPairs", "MinedTriplets", "pml 4-tuple", "pml 3-tuple"])
@pytest.mark.parametrize(
    "loss",
    [
        ContextualLoss(),
        SmoothAPLoss(),
        ROADMAPLoss(),
        ProxyAnchorLoss(4, 8),
        ProxyNCALoss(4, 8),
    ],
    ids=lambda loss: type(loss).__name__,
)
def test_losses_that_cannot_use_a_mining_refuse_it(loss, kind: str) -> None:
    x, y = batch()
    mined, _ = mined_variants(x, y)[kind]
    with pytest.raises(TypeError, match=f"indices_tuple: {type(loss).__name__} cannot use"):
        loss(x, y, mined)


def test_repeated_mined_pairs_count_with_their_multiplicity() -> None:
    """PML's pair losses weight a pair by how often the tuple lists it; a dense mask alone would not."""
    x, y = batch()
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=0.5)(x, y)
    twice = (torch.cat([a1, a1[:3]]), torch.cat([p, p[:3]]), a2, n)
    ours = ContrastiveLoss(0.9, 0.6)(x, y, twice)
    pml = pml_losses.ContrastiveLoss(0.9, 0.6, distance=pml_distances.CosineSimilarity())(x, y, twice)
    torch.testing.assert_close(ours, pml)
    assert not torch.isclose(ours, ContrastiveLoss(0.9, 0.6)(x, y, (a1, p, a2, n)))


def test_mined_index_tuples_are_validated() -> None:
    x, y = batch()
    loss = ContrastiveLoss()
    with pytest.raises(ValueError, match=r"mined negative indices must lie in \[0, 20\)"):
        loss(x, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([20])))
    with pytest.raises(ValueError, match="must be of equal length"):
        loss(x, y, (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]), torch.tensor([5])))
    with pytest.raises(TypeError, match="indices_tuple must be None"):
        loss(x, y, "pairs")


# -- reducers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_nonzero"])
def test_reductions_match_pml_reducers(reduction: str) -> None:
    x, y = batch(spread=1.5)
    reducer = {
        "mean": pml_reducers.MeanReducer(),
        "sum": pml_reducers.SumReducer(),
        "mean_nonzero": pml_reducers.AvgNonZeroReducer(),
    }[reduction]
    cosine = pml_distances.CosineSimilarity()
    pml_pairs = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, y)
    cases = [
        (
            ContrastiveLoss(0.9, 0.6, reduction=reduction),
            pml_losses.ContrastiveLoss(0.9, 0.6, distance=cosine, reducer=reducer),
            None,
        ),
        (
            TripletMarginLoss(0.1, reduction=reduction),
            pml_losses.TripletMarginLoss(0.1, reducer=reducer),
            None,
        ),
        (
            MultiSimilarityLoss(2.0, 50.0, 0.5, reduction=reduction),
            pml_losses.MultiSimilarityLoss(2.0, 50.0, 0.5, reducer=reducer),
            pml_pairs,
        ),
        (
            ContrastiveLoss(0.9, 0.6, reduction=reduction),
            pml_losses.ContrastiveLoss(0.9, 0.6, distance=cosine, reducer=reducer),
            pml_pairs,
        ),
    ]
    for ours, pml, mined in cases:
        torch.testing.assert_close(ours(x, y, mined), pml(x, y, mined), msg=type(ours).__name__)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mined", [False, True])
def test_margin_loss_reductions_match_pml_reducers(reduction: str, mined: bool) -> None:
    x, y = batch(spread=1.5)
    reducer = pml_reducers.MeanReducer() if reduction == "mean" else pml_reducers.SumReducer()
    triplets = pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")(x, y) if mined else None
    ours = MarginLoss(4, margin=0.2, beta=1.0, nu=0.1, reduction=reduction).double()
    ours.beta.data = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64)
    pml = pml_losses.MarginLoss(margin=0.2, nu=0.1, learn_beta=True, num_classes=4, reducer=reducer)
    pml.beta.data = ours.beta.data.clone()
    torch.testing.assert_close(ours(x, y, triplets), pml(x, y, triplets), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("selection", ["hard", "semihard"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_triplet_selection_with_reducers_matches_pml_miner_and_loss(selection: str, reduction: str) -> None:
    x, y = batch(spread=1.5)
    reducer = pml_reducers.MeanReducer() if reduction == "mean" else pml_reducers.AvgNonZeroReducer()
    mined = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=selection)(x, y)
    expected = pml_losses.TripletMarginLoss(margin=0.2, reducer=reducer)(x, y, mined)
    got = TripletMarginLoss(0.2, selection, reduction=reduction)(x, y)
    torch.testing.assert_close(got, expected)


# -- cosine triplets and the triplet miner ---------------------------------------------------------------


@pytest.mark.parametrize("selection", ["all", "hard", "semihard"])
def test_cosine_triplets_match_pml(selection: str) -> None:
    x, y = batch(spread=1.5)
    cosine = pml_distances.CosineSimilarity()
    pml_loss = pml_losses.TripletMarginLoss(margin=0.1, distance=cosine)
    mined = None
    if selection != "all":
        mined = pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets=selection, distance=cosine)(x, y)
    got = TripletMarginLoss(0.1, selection, distance="cosine")(x, y)
    torch.testing.assert_close(got, pml_loss(x, y, mined))
    given = MinedTriplets(*TripletMarginMiner(0.1, "all", distance="cosine")(x, y))
    torch.testing.assert_close(
        TripletMarginLoss(0.1, distance="cosine")(x, y, given),
        pml_loss(x, y, tuple(given)),
    )


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("selection", ["all", "hard", "semihard", "easy"])
def test_triplet_margin_miner_matches_pml(selection: str, distance: str) -> None:
    x, y = batch(spread=1.5)
    pml_distance = pml_distances.CosineSimilarity() if distance == "cosine" else pml_distances.LpDistance()
    expected = pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets=selection, distance=pml_distance)(
        x, y
    )
    got = TripletMarginMiner(0.1, selection, distance=distance)(x, y)
    assert isinstance(got, MinedTriplets) and len(got.anchor) > 0
    for ours, theirs in zip(got, expected, strict=True):
        assert torch.equal(ours, theirs)


def test_easy_selection_is_a_miner_not_a_triplet_loss_selection() -> None:
    with pytest.raises(ValueError, match="TripletMarginMiner"):
        TripletMarginLoss(selection="easy")  # type: ignore[arg-type]


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_multi_similarity_miner_matches_pml(distance: str) -> None:
    x, y = batch(spread=1.5)
    pml_distance = pml_distances.CosineSimilarity() if distance == "cosine" else pml_distances.LpDistance()
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(epsilon=0.1, distance=pml_distance)(x, y)
    got = MultiSimilarityMiner(0.1, distance=distance)(x, y)
    expected = MinedPairs(torch.zeros_like(got.positive), torch.zeros_like(got.negative))
    expected.positive[a1, p] = True
    expected.negative[a2, n] = True
    assert torch.equal(got.positive, expected.positive) and torch.equal(got.negative, expected.negative)
    assert bool(got.positive.any()) and bool(got.negative.any())


# -- proxy logits -------------------------------------------------------------------------------------------


def test_proxy_logits_match_pml_and_their_losses() -> None:
    x, y = batch()
    anchor = ProxyAnchorLoss(4, 8).double()
    pml_anchor = pml_losses.ProxyAnchorLoss(4, 8, margin=0.1, alpha=32)
    pml_anchor.proxies.data = anchor.proxies.data.clone()
    torch.testing.assert_close(anchor.get_logits(x), pml_anchor.get_logits(x))
    torch.testing.assert_close(anchor(x, y), pml_anchor(x, y))

    nca = ProxyNCALoss(4, 8, softmax_scale=9.0).double()
    pml_nca = pml_losses.ProxyNCALoss(4, 8, softmax_scale=9.0)
    pml_nca.proxies.data = nca.proxies.data.clone()
    logits = nca.get_logits(x)
    torch.testing.assert_close(logits, -9.0 * pml_nca.get_logits(x))  # PML returns squared distances
    torch.testing.assert_close(F.cross_entropy(logits, y), nca(x, y))
    torch.testing.assert_close(nca(x, y), pml_nca(x, y))
    assert logits.dtype == torch.float64 and nca.get_logits(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="embeddings have dim 5 but the proxies have 8"):
        nca.get_logits(torch.randn(3, 5))
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        anchor.get_logits(torch.full((3, 8), float("nan")))
