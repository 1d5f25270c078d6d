"""Losses and miners: brute-force references, numerics, empty batches, collapsed embeddings, bad input."""

from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import objretrieval.losses
from objretrieval.losses import (
    ContextualLoss,
    ContrastiveLoss,
    MarginLoss,
    MetricLoss,
    MultiSimilarityLoss,
    ParametricLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    SupConLoss,
    TripletMarginLoss,
    contextual_similarity,
)
from objretrieval.miners import DistanceWeightedMiner, MinedPairs, MinedTriplets, MultiSimilarityMiner


def batch(num_classes: int = 6, per_class: int = 4, dim: int = 12, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=g, dtype=dtype)
    x = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=g, dtype=dtype)
    return x, labels


def all_losses(num_classes: int, dim: int) -> list:
    return [
        ContextualLoss(),
        ContextualLoss.from_preset("cub"),
        ContrastiveLoss(),
        TripletMarginLoss(),
        TripletMarginLoss(selection="semihard", margin=0.2),
        TripletMarginLoss(selection="hard"),
        MultiSimilarityLoss(),
        ProxyAnchorLoss(num_classes, dim),
        ProxyNCALoss(num_classes, dim),
        SmoothAPLoss(),
        ROADMAPLoss(),
        MarginLoss(num_classes),
        SupConLoss(),
    ]


NUM_LOSSES = len(all_losses(2, 4))  # every loss above, for the parametrised checks


def test_all_losses_lists_every_exported_metric_loss() -> None:
    # the parametrised checks cover a new loss only once it is listed above: exporting it without fails here
    exported = [getattr(objretrieval.losses, name) for name in objretrieval.losses.__all__]
    metric_losses = {c for c in exported if inspect.isclass(c) and issubclass(c, MetricLoss)}
    assert {type(loss) for loss in all_losses(2, 4)} == metric_losses - {MetricLoss, ParametricLoss}


def brute_force_triplet(x: torch.Tensor, labels: torch.Tensor, margin: float, selection: str) -> torch.Tensor:
    f = F.normalize(x, dim=1)
    losses = []
    for a, p, n in itertools.product(range(len(x)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[a] == labels[n]:
            continue
        d_ap, d_an = (f[a] - f[p]).norm(), (f[a] - f[n]).norm()
        keep = {"all": True, "hard": d_an <= d_ap, "semihard": d_ap < d_an <= d_ap + margin}[selection]
        if keep:
            losses.append(torch.relu(d_ap - d_an + margin))
    values = torch.stack(losses)
    return values.sum() / (values > 0).sum()


@pytest.mark.parametrize("selection", ["all", "hard", "semihard"])
def test_triplet_selection_matches_brute_force(selection: str) -> None:
    x, y = batch(num_classes=4, per_class=4, dim=6)
    ours_x = x.clone().requires_grad_(True)
    ref_x = x.clone().requires_grad_(True)
    ours = TripletMarginLoss(margin=0.3, selection=selection)(ours_x, y)
    reference = brute_force_triplet(ref_x, y, 0.3, selection)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(ours_x.grad, ref_x.grad)


def test_triplets_from_pml_tuples_and_mined_structures_agree() -> None:
    x, y = batch()
    loss = TripletMarginLoss(margin=0.1)
    triplets = DistanceWeightedMiner(generator=torch.Generator().manual_seed(1))(x, y)
    assert isinstance(triplets, MinedTriplets)
    torch.testing.assert_close(loss(x, y, triplets), loss(x, y, tuple(triplets)))
    pairs = MultiSimilarityMiner()(x, y)
    ms = MultiSimilarityLoss()
    torch.testing.assert_close(ms(x, y, pairs), ms(x, y, pairs.to_indices()))


@pytest.mark.parametrize("normalizer", ["active_terms", "active_triplets"])
def test_margin_loss_over_all_triplets_matches_brute_force(normalizer: str) -> None:
    x, y = batch(num_classes=4, per_class=3, dim=5)
    loss = MarginLoss(4, margin=0.2, beta=1.0, normalizer=normalizer).double()
    loss.beta.data = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64)
    triplets = [
        (a, p, n)
        for a, p, n in itertools.product(range(len(y)), repeat=3)
        if a != p and y[a] == y[p] and y[a] != y[n]
    ]
    all_given = MinedTriplets(*(torch.tensor(t) for t in zip(*triplets, strict=True)))
    torch.testing.assert_close(loss(x, y), loss(x, y, all_given))


def test_multi_similarity_miner_definition() -> None:
    x, y = batch()
    mined = MultiSimilarityMiner(epsilon=0.1)(x, y)
    s = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if y[j] == y[i] and j != i]
        neg = [j for j in range(len(y)) if y[j] != y[i]]
        for j in pos:
            assert bool(mined.positive[i, j]) == bool(s[i, j] - 0.1 < s[i, neg].max())
        for j in neg:
            assert bool(mined.negative[i, j]) == bool(s[i, j] + 0.1 > s[i, pos].min())
    assert not bool(mined.positive.diagonal().any())


def test_reference_embeddings_compare_against_the_references_only() -> None:
    x, y = batch()
    r, ry = batch(seed=1)
    loss = ContrastiveLoss(0.9, 0.6)
    s = F.normalize(x, dim=1) @ F.normalize(r, dim=1).T
    same = y[:, None] == ry[None, :]
    pos = (0.9 - s).clamp(min=0)[same]
    neg = (s - 0.6).clamp(min=0)[~same]
    expected = pos.sum() / (pos > 0).sum() + neg.sum() / (neg > 0).sum()
    torch.testing.assert_close(loss(x, y, ref_emb=r, ref_labels=ry), expected)


@pytest.mark.parametrize("index", range(NUM_LOSSES))
def test_bf16_autocast_is_computed_in_float32(index: int) -> None:
    x, y = batch(dtype=torch.float32)
    net = torch.nn.Linear(12, 12)
    loss = all_losses(6, 12)[index]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        assert out.dtype == torch.bfloat16
        value = loss(out, y)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    reference = all_losses(6, 12)[index]
    reference.load_state_dict(loss.state_dict())
    torch.testing.assert_close(value, reference(out.detach().float(), y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("index", range(NUM_LOSSES))
def test_half_precision_inputs(index: int) -> None:
    x, y = batch(dtype=torch.float32)
    x = (x / 4).half().requires_grad_(True)  # small values: e^{alpha s} would overflow float16
    value = all_losses(6, 12)[index](x, y)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_a_batch_without_valid_triplets_gives_a_zero_loss_with_a_graph() -> None:
    x = torch.randn(6, 4, requires_grad=True)
    labels = torch.arange(6)  # no positives
    loss = TripletMarginLoss()
    with pytest.warns(RuntimeWarning, match="no valid pair or triplet"):
        value = loss(x, labels)
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert loss.num_empty_batches == 1
    with pytest.warns(RuntimeWarning):
        MarginLoss(6)(x, labels, MinedTriplets(*(torch.empty(0, dtype=torch.long),) * 3))


def test_contextual_loss_is_finite_on_collapsed_embeddings() -> None:
    """An untrained network maps a batch to nearly one direction; the official code returns NaN there."""
    torch.manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    x = (torch.ones(32, 16) + 1e-3 * torch.randn(32, 16)).requires_grad_(True)
    s = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    assert s.min() > 0.999
    j = contextual_similarity(s, k=4, eps=0.05)
    assert torch.isfinite(j).all()
    loss = ContextualLoss()
    opt = torch.optim.Adam([x], lr=0.05)  # scale-free steps: collapsed inputs have tiny raw gradients
    values, negative_similarity = [], []
    for _ in range(30):
        value = loss(x, labels)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        opt.step()
        values.append(value.item())
        with torch.no_grad():
            s = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
            negative_similarity.append(s[labels[:, None] != labels[None, :]].mean().item())
    assert values[-1] < values[0]
    assert negative_similarity[-1] < 0.9  # classes moved apart from the collapsed start


def test_short_training_run_from_random_initialisation() -> None:
    """A freshly initialised network trained with ContextualLoss: finite throughout, and it learns."""
    torch.manual_seed(0)
    num_classes, per_class, dim = 8, 4, 32
    centres = torch.randn(num_classes, dim)
    net = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    loss = ContextualLoss.from_preset("cub")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    values = []
    for _ in range(60):
        x = centres[labels] + 0.7 * torch.randn(len(labels), dim)
        value = loss(net(x), labels)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert sum(values[-10:]) / 10 < 0.7 * sum(values[:10]) / 10


def test_param_groups() -> None:
    proxy = ProxyAnchorLoss(5, 8)
    (group,) = proxy.param_groups(lr=1e-4)
    assert group["lr"] == pytest.approx(1e-2) and group["params"][0] is proxy.proxies
    assert proxy.param_groups(1e-4, multiplier=10)[0]["lr"] == pytest.approx(1e-3)
    margin = MarginLoss(5)
    (group,) = margin.param_groups(lr=1e-5, multiplier=50)  # MIC's margins: 5e-4 for a 1e-5 network
    assert group["lr"] == pytest.approx(5e-4) and group["weight_decay"] == 0.0
    assert margin.param_groups(lr=1e-3)[0]["lr"] == pytest.approx(1e-3)  # by default the network's rate
    before = proxy.proxies.detach().clone()
    opt = torch.optim.SGD(proxy.param_groups(lr=1e-3))
    proxy(torch.randn(10, 8), torch.randint(0, 5, (10,))).backward()
    opt.step()
    assert not torch.equal(before, proxy.proxies)


def test_distance_weighted_miner() -> None:
    x, y = batch(num_classes=5, per_class=4)
    y = torch.cat([y, torch.tensor([99])])  # a singleton: no positive, no triplet as anchor
    x = torch.cat([x, torch.randn(1, x.shape[1], dtype=x.dtype)])
    miner = DistanceWeightedMiner(generator=torch.Generator().manual_seed(0))
    a, p, n = miner(x, y)
    assert len(a) == 20 and 20 not in a.tolist()
    assert bool((y[a] == y[p]).all() and (a != p).all() and (y[a] != y[n]).all())
    again = DistanceWeightedMiner(generator=torch.Generator().manual_seed(0))(x, y)
    assert all(torch.equal(u, v) for u, v in zip(again, (a, p, n), strict=True))
    f = F.normalize(x, dim=1)
    probs = DistanceWeightedMiner(nonzero_loss_cutoff=0.0).negative_probabilities(f, y, f, y)
    negatives = (y[:, None] != y[None, :]).double()
    torch.testing.assert_close(probs, negatives / negatives.sum(1, keepdim=True))  # all cut: uniform
    torch.testing.assert_close(
        DistanceWeightedMiner().negative_probabilities(f, y, f, y).sum(1), torch.ones(len(y), dtype=x.dtype)
    )


def test_mined_pairs_restrict_the_loss() -> None:
    x, y = batch()
    nothing = MinedPairs(torch.zeros(24, 24, dtype=torch.bool), torch.zeros(24, 24, dtype=torch.bool))
    with pytest.warns(RuntimeWarning):
        assert MultiSimilarityLoss()(x, y, nothing).item() == 0.0


@pytest.mark.parametrize(
    ("loss", "args", "message"),
    [
        (ContrastiveLoss(), (torch.randn(8), torch.zeros(8, dtype=torch.long)), "embeddings must be 2-D"),
        (
            ContrastiveLoss(),
            (torch.randn(8, 4), torch.zeros(7, dtype=torch.long)),
            "labels has 7 entries, expected 8",
        ),
        (ContrastiveLoss(), (torch.randn(8, 4), torch.zeros(8)), "labels must have an integer dtype"),
        (
            ContrastiveLoss(),
            (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),
            "all 8 samples share one class",
        ),
        (ContrastiveLoss(), (torch.full((8, 4), float("nan")), torch.arange(8)), "embeddings contains NaN"),
        (
            ContrastiveLoss(),
            (torch.randn(8, 4).numpy(), torch.arange(8)),
            "embeddings must be a torch.Tensor",
        ),
        (ContextualLoss(), (torch.randn(8, 4), torch.arange(8)), None),
        (ContextualLoss(k=4), (torch.randn(3, 4), torch.arange(3)), "smaller than k=4"),
        (
            ProxyAnchorLoss(3, 4),
            (torch.randn(8, 4), torch.arange(8)),
            r"labels must lie in \[0, num_classes=3\)",
        ),
        (ProxyNCALoss(3, 5), (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), "embeddings have dim 4"),
        (
            TripletMarginLoss(),
            (torch.randn(8, 4), torch.arange(8) % 2, (torch.tensor([0]),) * 2),
            "indices_tuple",
        ),
        (
            TripletMarginLoss(),
            (torch.randn(8, 4), torch.arange(8) % 2, (torch.tensor([9]),) * 3),
            r"lie in \[0, 8\)",
        ),
    ],
)
def test_bad_input_is_rejected(loss, args, message) -> None:
    if message is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.isfinite(loss(*args))  # all distinct labels: no positives, still a defined loss
        return
    with pytest.raises((ValueError, TypeError), match=message):
        loss(*args)


def test_unsupported_reference_embeddings_are_rejected() -> None:
    x, y = batch()
    with pytest.raises(ValueError, match="ContextualLoss does not support ref_emb"):
        ContextualLoss()(x, y, ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match="must be given together"):
        ContrastiveLoss()(x, y, ref_emb=x)
    with pytest.raises(ValueError, match="unknown preset 'inat'"):
        ContextualLoss.from_preset("inat")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("index", range(NUM_LOSSES))
def test_cuda_autocast_matches_cpu(index: int) -> None:
    x, y = batch(dtype=torch.float32)
    cpu_loss = all_losses(6, 12)[index]
    gpu_loss = all_losses(6, 12)[index].cuda()
    gpu_loss.load_state_dict(cpu_loss.state_dict())
    xh = x.half()
    with torch.autocast("cuda", dtype=torch.float16):
        value = gpu_loss(xh.cuda(), y.cuda())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.cpu(), cpu_loss(xh.float(), y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("selection", ["all", "hard", "semihard"])
def test_triplet_counting_paths_agree_for_large_classes(selection: str, monkeypatch) -> None:
    """Anchors with many positives take the sort-based path; it must equal the comparison path."""
    import objretrieval.losses.triplet as triplet_module

    y = torch.cat([torch.zeros(40, dtype=torch.long), torch.arange(1, 30).repeat_interleave(3)])
    x = torch.randn(len(y), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for cap in (0, 10**6):  # 0: always sort; huge: always compare
        monkeypatch.setattr(triplet_module, "_COMPACT_MAX_POSITIVES", cap)
        leaf = x.clone().requires_grad_(True)
        value = TripletMarginLoss(0.2, selection)(leaf, y)
        value.backward()
        results.append((value, leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_custom_gradients_match_autograd() -> None:
    from objretrieval.batch import self_similarity
    from objretrieval.losses.contrastive import margin_contrastive

    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(self_similarity, (x,))
    s = torch.rand(9, 9, dtype=torch.float64, requires_grad=True)
    pos = torch.rand(9, 9) < 0.3
    assert torch.autograd.gradcheck(lambda t: margin_contrastive(t, pos, ~pos, 0.8, 0.3), (s,))
    big = torch.randn(600, 4, dtype=torch.float64)  # large enough for the panelled transpose-add
    big.requires_grad_(True)
    weights = torch.randn(600, 600, dtype=torch.float64)
    (self_similarity(big) * weights).sum().backward()
    torch.testing.assert_close(big.grad, (weights + weights.T) @ big.detach())
    labels = torch.arange(7) % 3
    for floor, offset in ((1e-12, 0.0), (0.0, 1e-8)):
        loss = TripletMarginLoss()
        loss.normalize_embeddings = False

        def distances(t, floor=floor, offset=offset, loss=loss):
            return loss.prepare_batch(t, labels).distances(floor, offset)

        assert torch.autograd.gradcheck(distances, (x,))
        ref = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        cross = loss.prepare_batch(x, labels, ref_emb=ref, ref_labels=torch.arange(5) % 3)
        expected = ((x[:, None] - ref[None]).pow(2).sum(-1).clamp(min=floor) + offset).sqrt()
        torch.testing.assert_close(cross.distances(floor, offset), expected)


def test_row_sampling_follows_the_weights() -> None:
    from scipy.stats import chisquare

    from objretrieval.miners.distance_weighted import sample_rows

    weights = torch.tensor(
        [[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64
    )
    draws = sample_rows(weights, 20_000, torch.Generator().manual_seed(0))
    assert draws.shape == (3, 20_000)
    assert bool((weights.gather(1, draws) > 0).all())  # zero-weight columns never come out
    for row in (0, 2):
        counts = torch.bincount(draws[row], minlength=4).double()
        support = weights[row] > 0
        expected = 20_000 * weights[row][support] / weights[row].sum()
        assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 1e-3


# -- pairwise losses (AMES training) ---------------------------------------------------------------------------


def _bce(x: float, y: float) -> float:
    import math

    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_pair_bce_loss_formula_and_target_types() -> None:
    from objretrieval.losses import PairBCELoss

    logits = torch.tensor([2.0, -1.0, 0.5])
    expected = [_bce(2.0, 1), _bce(-1.0, 0), _bce(0.5, 1)]
    for targets in (
        torch.tensor([True, False, True]),
        torch.tensor([1, 0, 1]),
        torch.tensor([1.0, 0.0, 1.0]),
    ):
        assert PairBCELoss()(logits, targets).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    per_pair = PairBCELoss(reduction="none")(logits, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(per_pair, torch.tensor(expected))
    weighted = PairBCELoss(pos_weight=3.0, reduction="sum")(logits, torch.tensor([1, 0, 1]))
    assert weighted.item() == pytest.approx(3 * expected[0] + expected[1] + 3 * expected[2], rel=1e-6)
    soft = PairBCELoss()(torch.tensor([0.3]), torch.tensor([0.25]))
    assert soft.item() == pytest.approx(_bce(0.3, 0.25), rel=1e-6)


def test_pair_bce_loss_is_float32_under_autocast() -> None:
    from objretrieval.losses import PairBCELoss

    logits = torch.tensor([2.0, -1.0], dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = PairBCELoss()(logits, torch.tensor([1, 0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_pair_distillation_loss() -> None:
    from objretrieval.losses import PairDistillationLoss

    student = torch.tensor([1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([3.0, -1.0], requires_grad=True)
    import math

    def sigmoid(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    # pure distillation: cross-entropy against the teacher's probabilities, at temperature 2 scaled by 4
    t = 2.0
    soft = [4 * _bce(1.0 / t, sigmoid(3.0 / t)), 4 * _bce(-2.0 / t, sigmoid(-1.0 / t))]
    loss = PairDistillationLoss(temperature=t)(student, teacher)
    assert loss.item() == pytest.approx(sum(soft) / 2, rel=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher is a fixed target
    # with labels: alpha * BCE + (1 - alpha) * distillation
    mixed = PairDistillationLoss(alpha=0.25, reduction="none")(student, teacher, torch.tensor([1, 0]))
    hard = [_bce(1.0, 1), _bce(-2.0, 0)]
    soft1 = [_bce(1.0, sigmoid(3.0)), _bce(-2.0, sigmoid(-1.0))]
    torch.testing.assert_close(
        mixed, torch.tensor([0.25 * h + 0.75 * s for h, s in zip(hard, soft1, strict=True)])
    )
    mse = PairDistillationLoss(kind="mse", alpha=0.0)(student, teacher, torch.tensor([1, 0]))
    assert mse.item() == pytest.approx((4.0 + 1.0) / 2)


def test_pairwise_loss_errors() -> None:
    from objretrieval.losses import PairBCELoss, PairDistillationLoss

    with pytest.raises(ValueError, match=r"targets must have the logits' shape \(3,\)"):
        PairBCELoss()(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"logits must be a non-empty \(B,\) tensor"):
        PairBCELoss()(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(TypeError, match="logits must be floating point"):
        PairBCELoss()(torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="integer targets must be 0 or 1"):
        PairBCELoss()(torch.zeros(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        PairBCELoss()(torch.zeros(2), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        PairBCELoss(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"teacher must have the student's shape \(2,\)"):
        PairDistillationLoss()(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        PairDistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        PairDistillationLoss(kind="kl")  # type: ignore[arg-type]


def test_margin_loss_learns_per_class_margins_only_when_given_classes() -> None:
    fixed = MarginLoss()
    assert not fixed.learn_beta and list(fixed.parameters()) == []  # PML's default: one constant beta
    learnt = MarginLoss(3)
    assert learnt.learn_beta and learnt.beta.shape == (3,) and learnt.beta.requires_grad
    assert not MarginLoss(3, learn_beta=False).learn_beta
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(learn_beta=True)


def test_mined_pair_masks_must_be_bool() -> None:
    x, y = torch.randn(8, 4), torch.arange(4).repeat_interleave(2)
    weights = torch.full((8, 8), 0.5)
    with pytest.raises(TypeError, match="mined pair masks must be bool"):
        ContrastiveLoss()(x, y, MinedPairs(weights, weights))
