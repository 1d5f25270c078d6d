"""SupConLoss against pytorch-metric-learning's SupConLoss and a brute-force loop over the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from objretrieval.losses import SupConLoss
from objretrieval.miners import MultiSimilarityMiner, TripletMarginMiner

DIM = 8
TOL = {torch.float64: 1e-10, torch.float32: 1e-6}


def data(n: int = 20, num_classes: int = 7, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g, dtype=dtype)
    return x, torch.randint(0, num_classes, (n,), generator=g)


def value_and_grad(loss_fn, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.clone().requires_grad_(True)
    value = loss_fn(leaf, *args, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


def assert_same(
    ours: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    tol = TOL[reference[0].dtype]
    for got, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def brute_force(x: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al.'s L_out, one view per sample, averaged over the anchors that have a positive."""
    f = F.normalize(x, dim=1)
    per_anchor = []
    for i in range(len(x)):
        others = [a for a in range(len(x)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        log_norm = torch.logsumexp(torch.stack([f[i] @ f[a] / temperature for a in others]), 0)
        per_anchor.append(-sum(f[i] @ f[p] / temperature - log_norm for p in positives) / len(positives))
    return torch.stack(per_anchor).mean()


# -- the values and gradients of PML's SupConLoss ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
@pytest.mark.parametrize(
    "labels",
    [
        lambda n: torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(1)),  # singletons too
        lambda n: torch.arange(n) % 2,
    ],
    ids=["random_with_singletons", "two_classes"],
)
def test_equals_pml(dtype, temperature: float, labels) -> None:
    x, _ = data(dtype=dtype)
    y = labels(len(x))
    assert_same(
        value_and_grad(SupConLoss(temperature), x, y),
        value_and_grad(pml_losses.SupConLoss(temperature), x, y),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_pml_against_references(dtype) -> None:
    x, y = data(dtype=dtype)
    ref, ref_y = data(13, seed=2, dtype=dtype)
    refs = {"ref_emb": ref, "ref_labels": ref_y}
    assert_same(
        value_and_grad(SupConLoss(), x, y, **refs), value_and_grad(pml_losses.SupConLoss(), x, y, **refs)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("ours_miner", "pml_miner"),
    [
        (MultiSimilarityMiner(), pml_miners.MultiSimilarityMiner()),
        (
            TripletMarginMiner(0.2, "semihard"),
            pml_miners.TripletMarginMiner(0.2, type_of_triplets="semihard"),
        ),
    ],
    ids=["pairs", "triplets"],
)
def test_equals_pml_on_mined_pairs(dtype, ours_miner, pml_miner) -> None:
    x, y = data(dtype=dtype)
    ours_mined, pml_mined = ours_miner(x, y), pml_miner(x, y)
    assert len(pml_mined[0]) > 0 and len(pml_mined[-1]) > 0  # the mining selects something to contrast
    reference = value_and_grad(pml_losses.SupConLoss(), x, y, pml_mined)
    assert_same(value_and_grad(SupConLoss(), x, y, ours_mined), reference)
    assert_same(
        value_and_grad(SupConLoss(), x, y, pml_mined), reference
    )  # PML's index tuple, as PML reads it
    # the mining changes the loss: the softmax runs over the mined pairs only
    assert abs(float(reference[0] - SupConLoss()(x, y))) > 1e-3


@pytest.mark.parametrize(
    ("reduction", "reducer"), [("mean", pml_reducers.MeanReducer), ("sum", pml_reducers.SumReducer)]
)
def test_equals_pml_with_its_other_reducers(reduction: str, reducer) -> None:
    x, y = data()  # anchors without positives: "mean" counts them, the default leaves them out
    assert_same(
        value_and_grad(SupConLoss(reduction=reduction), x, y),
        value_and_grad(pml_losses.SupConLoss(reducer=reducer()), x, y),
    )


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_equals_the_formula_of_the_paper(temperature: float) -> None:
    x, y = data(12, num_classes=5, seed=3)
    assert any((y == c).sum() == 1 for c in y)  # an anchor without positives, still a negative of the others
    assert_same(value_and_grad(SupConLoss(temperature), x, y), value_and_grad(brute_force, x, y, temperature))


def test_self_pairs_among_the_references_are_not_positives() -> None:
    x, y = data()
    expected = SupConLoss()(x, y)
    got = SupConLoss()(x, y, ref_emb=x.clone(), ref_labels=y, ref_self_index=torch.arange(len(x)))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (
        abs(float(SupConLoss()(x, y, ref_emb=x.clone(), ref_labels=y) - expected)) > 1e-3
    )  # without: they are


# -- batches with nothing to contrast ------------------------------------------------------------------------


def test_a_batch_without_positive_pairs_is_a_zero_loss_with_zero_gradients_as_in_pml() -> None:
    x, _ = data(6)
    y = torch.arange(6)
    with pytest.warns(RuntimeWarning, match="SupConLoss: no valid pair"):
        value, grad = value_and_grad(SupConLoss(), x, y)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))
    pml_value, pml_grad = value_and_grad(pml_losses.SupConLoss(), x, y)
    assert pml_value.item() == 0.0 and torch.equal(pml_grad, torch.zeros_like(x))


def test_mined_positives_without_mined_negatives_are_a_zero_loss_as_in_pml() -> None:
    x, _ = data(6)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    none = torch.tensor([], dtype=torch.long)
    only_positives = (torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3]), none, none)
    with pytest.warns(RuntimeWarning, match="no valid pair"):
        assert SupConLoss()(x, y, only_positives).item() == 0.0
    assert pml_losses.SupConLoss()(x, y, only_positives).item() == 0.0


def test_a_batch_of_one_class_is_an_error() -> None:
    x, _ = data(6)
    # PML returns 0 here (no negative pair); as for every loss comparing classes, ours names the mistake
    with pytest.raises(ValueError, match="labels: all 6 samples share one class; SupConLoss"):
        SupConLoss()(x, torch.full((6,), 3))


# -- bad input and the dtype rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused(bad: float) -> None:
    x, y = data()
    x[4, 2] = bad
    with pytest.raises(ValueError, match=r"embeddings contains NaN or inf values \(first at row 4\)"):
        SupConLoss()(x, y)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": 0.0}, ValueError, r"temperature must lie in \(0, inf\), got 0"),
        ({"temperature": -0.1}, ValueError, r"temperature must lie in \(0, inf\)"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"tiled": 1}, TypeError, "tiled must be a bool, got int"),
        ({"tile_size": 0}, ValueError, "tile_size must be >= 1"),
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
    ],
)
def test_nonsense_arguments_are_refused(kwargs, error, message: str) -> None:
    with pytest.raises(error, match=message):
        SupConLoss(**kwargs)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(half) -> None:
    x, y = data(dtype=torch.float32)
    x = x.to(half)
    value, grad = value_and_grad(SupConLoss(), x, y)
    assert value.dtype == torch.float32 and grad.dtype == half
    assert_same((value,), (pml_losses.SupConLoss()(x.float(), y),))  # the float32 loss of the same inputs


def test_a_loss_of_close_embeddings_at_a_low_temperature_is_finite() -> None:
    x, y = data(dtype=torch.float32)
    x = x[:1] + 1e-3 * x  # nearly one direction, as from a random start; logits up to 1 / 0.01
    value, grad = value_and_grad(SupConLoss(0.01), x, y)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert math.isclose(value.item(), pml_losses.SupConLoss(0.01)(x, y).item(), rel_tol=1e-5)


# -- the tiled path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"tiled": True}, {"backend": "auto"}])
def test_the_tiled_path_refuses_what_it_cannot_compute(kwargs) -> None:
    x, y = data()
    loss = SupConLoss(**kwargs)
    with pytest.raises(ValueError, match="ref_emb: the tiled SupConLoss"):
        loss(x, y, ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match="indices_tuple: the tiled SupConLoss"):
        loss(x, y, MultiSimilarityMiner()(x, y))
    with pytest.raises(ValueError, match="labels: all 20 samples share one class; SupConLoss"):
        loss(x, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="label_comparison: the tiled path"):
        SupConLoss(label_comparison=lambda a, b: a[:, None] // 2 == b[None, :] // 2, **kwargs)
    with pytest.raises(ValueError, match=r"reduction: the tiled SupConLoss.*'mean_nonzero' only, got 'sum'"):
        SupConLoss(reduction="sum", **kwargs)


def test_the_tiled_path_returns_a_zero_loss_for_a_batch_without_positives() -> None:
    x, _ = data(6)
    loss = SupConLoss(tiled=True)
    with pytest.warns(RuntimeWarning, match="SupConLoss: no valid pair or triplet in this batch"):
        value, grad = value_and_grad(loss, x, torch.arange(6))
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(x)) and loss.num_empty_batches == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kwargs",
    [{"tiled": True, "tile_size": 3}, {"tiled": True, "tile_size": 64}, {"backend": "auto"}],
    ids=["tail", "one_tile", "auto"],  # tiles with a tail; one tile larger than the batch; auto on CPU
)
def test_the_tiled_path_equals_pml(dtype, kwargs) -> None:
    x, _ = data(11, dtype=dtype)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])  # 2 and 4: anchors without positives
    assert_same(value_and_grad(SupConLoss(**kwargs), x, y), value_and_grad(pml_losses.SupConLoss(), x, y))


def test_the_tiled_path_follows_the_dtype_rule() -> None:
    x, y = data(dtype=torch.float32)
    value, grad = value_and_grad(SupConLoss(tiled=True), x.half(), y)
    assert value.dtype == torch.float32 and grad.dtype == torch.float16
    assert_same((value,), (SupConLoss()(x.half().float(), y),))
