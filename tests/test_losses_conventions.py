"""What every loss shares: the dtype rule, the parts of multi-term losses, label comparison, argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from objretrieval.losses import (
    AdversarialDecorrelationLoss,
    AVSLMarginLoss,
    AVSLPairwiseProxyAnchorLoss,
    AVSLProxyAnchorLoss,
    ContextualLoss,
    ContrastiveLoss,
    MarginLoss,
    MetricLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    SupConLoss,
    TripletMarginLoss,
    contextual_similarity,
    ranking_average_precision,
)
from objretrieval.miners import DistanceWeightedMiner, MultiSimilarityMiner, TripletMarginMiner
from objretrieval.models import AVSL
from objretrieval.models.avsl import AVSLFeatures, LevelDistances

DIM = 12


def batch(dtype=torch.float32, num_classes: int = 4, per_class: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, DIM, generator=g)
    x = centres[labels] + 0.8 * torch.randn(len(labels), DIM, generator=g)
    return x.to(dtype), labels


def metric_losses() -> list[MetricLoss]:
    return [
        ContextualLoss(),
        ContrastiveLoss(),
        TripletMarginLoss(),
        TripletMarginLoss(selection="hard", distance="cosine"),
        MultiSimilarityLoss(),
        ProxyAnchorLoss(4, DIM),
        ProxyNCALoss(4, DIM),
        SmoothAPLoss(),
        ROADMAPLoss(),
        MarginLoss(4),
        SupConLoss(),
    ]


# -- one dtype rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(metric_losses())))
@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, torch.float64), (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_every_metric_loss_follows_the_dtype_rule(index: int, dtype, expected) -> None:
    loss = metric_losses()[index]  # float32 parameters (proxies, margins) whatever the input
    x, y = batch()
    leaf = (x / 4).to(dtype).requires_grad_(True)  # small values: e^{alpha s} would overflow float16
    value = loss(leaf, y)
    value.backward()
    assert value.dtype == expected and torch.isfinite(value) and torch.isfinite(leaf.grad).all()
    assert leaf.grad.dtype == dtype


@pytest.mark.parametrize("index", range(len(metric_losses())))
def test_every_metric_loss_computes_in_float32_under_autocast(index: int) -> None:
    loss = metric_losses()[index]
    x, y = batch()
    net = torch.nn.Linear(DIM, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x / 4)
        assert out.dtype == torch.bfloat16
        value = loss(out, y)
    assert value.dtype == torch.float32
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def _avsl_losses():
    return [
        AVSLProxyAnchorLoss(num_classes=4, embed_dim=8),
        AVSLPairwiseProxyAnchorLoss(),
        AVSLMarginLoss(num_classes=4, generator=torch.Generator().manual_seed(0)),
    ]


@pytest.mark.parametrize("index", range(3))
def test_avsl_losses_follow_the_dtype_rule(index: int) -> None:
    torch.manual_seed(0)
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=8, topk=5)
    maps = [torch.rand(8, 4, 4, 4), torch.rand(8, 4, 2, 2), torch.rand(8, 4, 2, 2)]
    labels = torch.arange(8) % 4
    loss_fn = _avsl_losses()[index]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(model, model.forward_features(maps), labels)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    # float64 distances (the AVSL model itself computes in float32) must stay float64 in the loss
    features = model.forward_features(maps)
    features64 = AVSLFeatures(
        tuple(e.double() for e in features.embeddings), tuple(c.double() for c in features.certainties)
    )
    out64 = loss_fn.double()(_squared_distances, features64, labels)
    assert out64.loss.dtype == torch.float64 and all(p.dtype == torch.float64 for p in out64.levels)


def _squared_distances(rows: AVSLFeatures, cols: AVSLFeatures) -> LevelDistances:
    """A stand-in similarity graph in the inputs' dtype: per-level squared distances, final = their mean."""
    levels = tuple(
        torch.cdist(F.normalize(r, dim=1), F.normalize(c, dim=1)).square()
        for r, c in zip(rows.embeddings, cols.embeddings, strict=True)
    )
    return LevelDistances(torch.stack(levels).mean(0), levels)


def test_adversarial_loss_follows_the_dtype_rule() -> None:
    loss = AdversarialDecorrelationLoss(6, 5, proj_dim=7)
    c, s = torch.randn(4, 6), torch.randn(4, 5)
    assert loss(c.double(), s.double()).dtype == torch.float64
    assert loss(c.bfloat16(), s.half()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(c, s).dtype == torch.float32


@pytest.mark.parametrize("miner", [MultiSimilarityMiner(), DistanceWeightedMiner(), TripletMarginMiner()])
def test_miners_accept_every_precision(miner) -> None:
    x, y = batch()
    reference = miner(x, y)
    if isinstance(miner, DistanceWeightedMiner):
        return  # random draws; the dtype rule is the base class's, shared with the other miners
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = miner(x, y)
    assert all(torch.equal(u, v) for u, v in zip(reference, autocast, strict=True))
    assert all(t.shape == u.shape for t, u in zip(reference, miner(x.double(), y), strict=True))


# -- the parts of multi-term losses --------------------------------------------------------------------------


def test_multi_term_losses_expose_their_parts_one_way() -> None:
    x, y = batch()
    contextual = ContextualLoss(context_weight=0.3, contrastive_weight=0.5, reg_weight=0.2)
    value = contextual(x, y)
    parts = contextual.last_parts
    assert set(parts) == {"context", "contrastive", "reg"}
    torch.testing.assert_close(
        value, 0.3 * parts["context"] + 0.5 * parts["contrastive"] + 0.2 * parts["reg"]
    )
    assert all(not p.requires_grad for p in parts.values())
    roadmap = ROADMAPLoss(lam=0.25)
    value = roadmap(x, y)
    torch.testing.assert_close(
        value, 0.75 * roadmap.last_parts["supap"] + 0.25 * roadmap.last_parts["contrastive"]
    )
    single = ContrastiveLoss()
    single(x, y)
    assert single.last_parts == {}


def test_avsl_losses_expose_their_parts_as_the_others() -> None:
    torch.manual_seed(0)
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=8, topk=5)
    maps = [torch.rand(8, 4, 4, 4), torch.rand(8, 4, 2, 2), torch.rand(8, 4, 2, 2)]
    loss_fn = AVSLProxyAnchorLoss(num_classes=4, embed_dim=8, level_weights=(1.0, 2.0, 3.0))
    out = loss_fn(model, model.forward_features(maps), torch.arange(8) % 4)
    parts = loss_fn.last_parts
    assert list(parts) == ["final", "level0", "level1", "level2"]
    torch.testing.assert_close(parts["final"], out.final.detach())
    torch.testing.assert_close(
        out.loss.detach(), parts["final"] + parts["level0"] + 2 * parts["level1"] + 3 * parts["level2"]
    )


# -- label comparison ----------------------------------------------------------------------------------------


def _coarse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hierarchical labels: fine classes 2c and 2c + 1 share the coarse class c."""
    return (a[:, None] // 2) == (b[None, :] // 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ContrastiveLoss(**kw),
        lambda **kw: TripletMarginLoss(selection="semihard", margin=0.2, **kw),
        lambda **kw: MultiSimilarityLoss(**kw),
        lambda **kw: ContextualLoss(**kw),
        lambda **kw: SmoothAPLoss(**kw),
        lambda **kw: ROADMAPLoss(**kw),
        lambda **kw: SupConLoss(**kw),
    ],
)
def test_a_label_comparison_replaces_label_equality(make) -> None:
    x, fine = batch(num_classes=8, per_class=3)
    torch.testing.assert_close(make(label_comparison=_coarse)(x, fine), make()(x, fine // 2))


def test_miners_and_the_margin_loss_take_a_label_comparison() -> None:
    x, fine = batch(num_classes=8, per_class=3)
    mined = MultiSimilarityMiner(label_comparison=_coarse)(x, fine)
    expected = MultiSimilarityMiner()(x, fine // 2)
    assert torch.equal(mined.positive, expected.positive) and torch.equal(mined.negative, expected.negative)
    triplets = TripletMarginMiner(0.2, "all", label_comparison=_coarse)(x, fine)
    assert all(
        torch.equal(u, v) for u, v in zip(triplets, TripletMarginMiner(0.2, "all")(x, fine // 2), strict=True)
    )
    a, p, n = DistanceWeightedMiner(label_comparison=_coarse)(x, fine)
    assert bool(((fine[a] // 2) == (fine[p] // 2)).all() and ((fine[a] // 2) != (fine[n] // 2)).all())
    margin = MarginLoss(8, label_comparison=_coarse)  # margins stay per fine class
    assert torch.isfinite(margin(x, fine))


def test_a_bad_label_comparison_is_refused() -> None:
    x, y = batch()
    with pytest.raises(TypeError, match=r"label_comparison must return a bool tensor of shape \(16, 16\)"):
        ContrastiveLoss(label_comparison=lambda a, b: (a[:, None] == b[None, :]).float())(x, y)
    with pytest.raises(TypeError, match="label_comparison must be callable"):
        ContrastiveLoss(label_comparison="coarse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="share one class"):
        ContrastiveLoss(label_comparison=lambda a, b: torch.ones(len(a), len(b), dtype=torch.bool))(x, y)


# -- arguments that would give nonsense --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ContextualLoss(eps=-0.01), r"eps must lie in \[0, inf\)"),
        (lambda: ContextualLoss(k=1), "k must be >= 2"),
        (lambda: ContextualLoss(slope=0.0), r"slope must lie in \(0, inf\)"),
        (lambda: ContextualLoss(context_weight=-1.0), r"context_weight must lie in \[0, inf\)"),
        (lambda: ContextualLoss(reg_target=1.5), r"reg_target must lie in \[-1, 1\]"),
        (lambda: ContrastiveLoss(pos_margin=1.2), r"pos_margin must lie in \[-1, 1\]"),
        (lambda: ContrastiveLoss(reduction="max"), "reduction must be one of"),  # type: ignore[arg-type]
        (lambda: TripletMarginLoss(margin=float("nan")), "margin must be finite"),
        (lambda: TripletMarginLoss(distance="l1"), "distance must be one of"),  # type: ignore[arg-type]
        (lambda: MultiSimilarityLoss(alpha=0.0), r"alpha must lie in \(0, inf\)"),
        (lambda: MultiSimilarityLoss(beta=-1.0), r"beta must lie in \(0, inf\)"),
        (lambda: ProxyAnchorLoss(4, 8, alpha=0.0), r"alpha must lie in \(0, inf\)"),
        (lambda: ProxyAnchorLoss(4, 8, margin=-0.1), r"margin must lie in \[0, inf\)"),
        (lambda: ProxyAnchorLoss(0, 8), "num_classes must be >= 1"),
        (lambda: ProxyNCALoss(4, 8, softmax_scale=0.0), r"softmax_scale must lie in \(0, inf\)"),
        (lambda: SmoothAPLoss(tau=0.0), r"tau must lie in \(0, inf\)"),
        (lambda: ROADMAPLoss(lam=1.5), r"lam must lie in \[0, 1\]"),
        (lambda: ROADMAPLoss(tau=-1.0), r"tau must lie in \(0, inf\)"),
        (lambda: MarginLoss(4, beta=0.0), r"beta must lie in \(0, inf\)"),
        (lambda: MarginLoss(4, nu=-1.0), r"nu must lie in \[0, inf\)"),
        (lambda: MarginLoss(0), "num_classes must be >= 1"),
        (lambda: SupConLoss(temperature=0.0), r"temperature must lie in \(0, inf\)"),
        (lambda: MultiSimilarityMiner(epsilon=-0.1), r"epsilon must lie in \[0, inf\)"),
        (lambda: DistanceWeightedMiner(cutoff=2.0), r"cutoff must lie in \[0, 2\)"),
        (lambda: DistanceWeightedMiner(triplets_per_anchor=0), "triplets_per_anchor must be >= 1"),
        (lambda: TripletMarginMiner(selection="medium"), "selection must be one of"),  # type: ignore[arg-type]
        (lambda: AVSLProxyAnchorLoss(4, alpha=0.0), r"alpha must lie in \(0, inf\)"),
        (lambda: AVSLProxyAnchorLoss(4, final_neg_margin=5.0), r"final_neg_margin must lie in \[0, 4\]"),
        (lambda: AVSLMarginLoss(4, hardneg_cutoff=-1.0), r"hardneg_cutoff must lie in \[0, inf\)"),
        (lambda: AVSLMarginLoss(0), "num_classes must be >= 1"),
        (lambda: AVSLPairwiseProxyAnchorLoss(level_weights=(1.0, -1.0, 1.0)), r"level_weights must lie"),
        (lambda: AdversarialDecorrelationLoss(0, 4), "class_dim must be >= 1"),
    ],
)
def test_nonsense_arguments_are_refused(make, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_nonsense_arguments_of_the_functions_are_refused() -> None:
    s = torch.rand(6, 6)
    with pytest.raises(ValueError, match=r"eps must lie in \[0, inf\)"):
        contextual_similarity(s, k=2, eps=-0.1)
    with pytest.raises(ValueError, match=r"tau must lie in \(0, inf\)"):
        ranking_average_precision(s, torch.eye(6, dtype=torch.bool), tau=0.0)


def test_avsl_margin_loss_refuses_a_single_class_batch() -> None:
    torch.manual_seed(0)
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=8, topk=5)
    maps = [torch.rand(6, 4, 4, 4), torch.rand(6, 4, 2, 2), torch.rand(6, 4, 2, 2)]
    with pytest.raises(ValueError, match="labels: all 6 samples share one class; AVSLMarginLoss"):
        AVSLMarginLoss(num_classes=4)(model, model.forward_features(maps), torch.full((6,), 2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=4\)"):
        AVSLMarginLoss(num_classes=4)(model, model.forward_features(maps), torch.arange(6))


def test_labels_indexing_class_parameters_are_range_checked_once_for_every_loss() -> None:
    x, y = batch()
    for loss in (ProxyAnchorLoss(3, DIM), ProxyNCALoss(3, DIM), MarginLoss(3)):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\), got min 0, max 3"):
            loss(x, y)
    assert torch.isfinite(MarginLoss(learn_beta=False)(x, y + 100))  # a constant margin indexes nothing
