"""Tiled pairwise losses: the torch tiles against the dense loss classes and pytorch-metric-learning (values in
float32, gradients against float64 autograd of the dense losses), the Triton kernels under the interpreter (in
a subprocess, since Triton reads TRITON_INTERPRET when a kernel is made) against the torch tiles, and the
memory bound: no tensor of the tiled path's forward and backward is anywhere near the (B, B) matrix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity
from torch.utils._python_dispatch import TorchDispatchMode

from objretrieval.kernels.pairwise_losses import (
    tiled_contrastive_loss,
    tiled_multi_similarity_loss,
    tiled_supcon_loss,
)
from objretrieval.losses import ContrastiveLoss, MultiSimilarityLoss, SupConLoss
from objretrieval.miners import MultiSimilarityMiner
from tests.interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

#: name -> (tiled function, its keyword arguments, the dense reference: (embeddings, labels) -> loss)
LOSSES: dict[str, tuple[Callable, dict, Callable]] = {
    "contrastive": (tiled_contrastive_loss, {}, lambda x, y: ContrastiveLoss()(x, y)),
    "contrastive_mean": (
        tiled_contrastive_loss,
        {"pos_margin": 0.9, "neg_margin": 0.3, "reduction": "mean"},
        lambda x, y: ContrastiveLoss(0.9, 0.3, reduction="mean")(x, y),
    ),
    "contrastive_sum": (
        tiled_contrastive_loss,
        {"pos_margin": 0.8, "neg_margin": 0.2, "reduction": "sum"},
        lambda x, y: ContrastiveLoss(0.8, 0.2, reduction="sum")(x, y),
    ),
    "multi_similarity": (tiled_multi_similarity_loss, {}, lambda x, y: MultiSimilarityLoss()(x, y)),
    "multi_similarity_mined": (
        tiled_multi_similarity_loss,
        {"mining_epsilon": 0.1, "reduction": "mean_nonzero"},
        lambda x, y: MultiSimilarityLoss(reduction="mean_nonzero")(x, y, MultiSimilarityMiner(0.1)(x, y)),
    ),
    "multi_similarity_scaled": (
        tiled_multi_similarity_loss,
        {"alpha": 5.0, "beta": 20.0, "base": 0.2, "mining_epsilon": 0.3},
        lambda x, y: MultiSimilarityLoss(5.0, 20.0, 0.2)(x, y, MultiSimilarityMiner(0.3)(x, y)),
    ),
    "supcon": (tiled_supcon_loss, {}, lambda x, y: SupConLoss()(x, y)),
    "supcon_pml": (
        tiled_supcon_loss,
        {"temperature": 0.07},
        lambda x, y: pml_losses.SupConLoss(temperature=0.07)(x, y),
    ),
}


def _batch(num: int, dim: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 embeddings and labels: ``random`` classes, ``singletons`` (some classes of one sample: anchors
    without positives), ``separated`` (tight, far-apart classes: the miner keeps no pair)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, max(2, num // 5), (num,), generator=g)
    if kind == "singletons":
        labels[: num // 3] = torch.arange(100, 100 + num // 3)
    x = torch.randn(num, dim, generator=g, dtype=torch.float64)
    if kind == "separated":
        labels = torch.arange(num) % 3
        x = torch.eye(dim, dtype=torch.float64)[labels] + 0.01 * x
    return x, labels


# (name, B, D, labels, tile_size): tails, a tile above B, singletons
SHAPES = [
    ("odd_tails", 37, 12, "random", 16),
    ("tile_above_batch", 21, 8, "random", 64),
    ("singletons", 29, 10, "singletons", 7),
    ("one_row_tiles", 9, 5, "random", 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_torch_tiles_match_dense_loss(loss: str, shape: tuple) -> None:
    fn, kwargs, dense = LOSSES[loss]
    _, num, dim, kind, tile = shape
    x, y = _batch(num, dim, kind)
    x32 = x.float()
    torch.testing.assert_close(fn(x32, y, tile_size=tile, **kwargs), dense(x32, y), rtol=1e-6, atol=1e-6)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    tiled, reference = fn(a, y, tile_size=tile, **kwargs), dense(b, y)
    assert tiled.dtype == torch.float64
    torch.testing.assert_close(tiled, reference, rtol=1e-12, atol=1e-12)
    tiled.backward()
    reference.backward()
    assert b.grad is not None and float(b.grad.abs().max()) > 0  # a gradient worth comparing
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_supcon_matches_pml_values_and_gradients() -> None:
    x, y = _batch(33, 16, "singletons", seed=3)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    tiled, reference = tiled_supcon_loss(a, y, tile_size=8), pml_losses.SupConLoss()(b, y)
    torch.testing.assert_close(tiled, reference, rtol=1e-12, atol=1e-12)
    tiled.backward()
    reference.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_multi_similarity_mining_matches_pml() -> None:
    """Mining inside the loss = PML's MultiSimilarityMiner feeding PML's MultiSimilarityLoss."""
    x, y = _batch(31, 12, "random", seed=4)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    tiled = tiled_multi_similarity_loss(a, y, mining_epsilon=0.1, tile_size=8)
    pml = pml_losses.MultiSimilarityLoss()(b, y, pml_miners.MultiSimilarityMiner(0.1)(b, y))
    torch.testing.assert_close(tiled, pml, rtol=1e-12, atol=1e-12)
    tiled.backward()
    pml.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("fn", "kwargs", "pml"),
    [
        (
            tiled_contrastive_loss,
            {},
            pml_losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity()),
        ),
        (tiled_multi_similarity_loss, {}, pml_losses.MultiSimilarityLoss()),
        (tiled_supcon_loss, {}, pml_losses.SupConLoss()),  # no negative pair: 0, as PML
    ],
    ids=["contrastive", "multi_similarity", "supcon"],
)
def test_one_class_batch_has_no_negatives(fn: Callable, kwargs: dict, pml: torch.nn.Module) -> None:
    x, _ = _batch(19, 6, "random", seed=5)
    y = torch.zeros(19, dtype=torch.int64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    tiled, reference = fn(a, y, tile_size=8, **kwargs), pml(b, y)
    torch.testing.assert_close(tiled, reference.to(tiled.dtype), rtol=1e-12, atol=1e-12)
    tiled.backward()
    reference.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_mining_that_removes_every_pair_gives_zero() -> None:
    x, y = _batch(24, 8, "separated", seed=6)
    mined = MultiSimilarityMiner(0.1)(x, y)
    assert not bool(mined.positive.any()) and not bool(mined.negative.any())  # the case is what it claims
    a = x.clone().requires_grad_()
    loss = tiled_multi_similarity_loss(a, y, mining_epsilon=0.1, tile_size=8)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not bool(a.grad.any())
    with pytest.warns(RuntimeWarning, match="no valid pair"):
        assert float(MultiSimilarityLoss()(x, y, mined)) == 0.0


def test_half_inputs_compute_in_float32() -> None:
    x, y = _batch(17, 8, "random", seed=7)
    half = x.half().requires_grad_()
    for fn in (tiled_contrastive_loss, tiled_multi_similarity_loss, tiled_supcon_loss):
        loss = fn(half, y, tile_size=8)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, fn(half.detach().float(), y, tile_size=8), rtol=0, atol=0)
        (grad,) = torch.autograd.grad(loss, half)
        assert grad.dtype == torch.float16 and bool(grad.isfinite().all())


def test_autocast_does_not_lower_the_precision() -> None:
    x, y = _batch(20, 8, "random", seed=15)
    x = x.float()
    for fn in (tiled_contrastive_loss, tiled_multi_similarity_loss, tiled_supcon_loss):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = fn(x, y, tile_size=8)
        assert under_autocast.dtype == torch.float32
        torch.testing.assert_close(under_autocast, fn(x, y, tile_size=8), rtol=0, atol=0)


def test_auto_runs_torch_tiles_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, y = _batch(15, 6, "random", seed=8)
    for fn in (tiled_contrastive_loss, tiled_multi_similarity_loss, tiled_supcon_loss):
        assert torch.equal(fn(x, y, backend="auto"), fn(x, y))


# ---------------------------------------------------------------------------------------------------------
# The loss classes' routing.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ContrastiveLoss(0.9, 0.4, reduction="mean", **kw),
        lambda **kw: MultiSimilarityLoss(mining_epsilon=0.1, **kw),
        lambda **kw: SupConLoss(**kw),
    ],
    ids=["contrastive", "multi_similarity", "supcon"],
)
def test_classes_tiled_path_equals_dense_path(make: Callable) -> None:
    x, y = _batch(26, 8, "singletons", seed=9)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    tiled, dense = make(tiled=True, tile_size=8)(a, y), make()(b, y)
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
    tiled.backward()
    dense.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(make(backend="auto")(x, y), dense, rtol=1e-12, atol=1e-12)


def test_dense_mining_epsilon_equals_the_miner() -> None:
    x, y = _batch(30, 8, "random", seed=10)
    inside = MultiSimilarityLoss(mining_epsilon=0.2)(x, y)
    torch.testing.assert_close(inside, MultiSimilarityLoss()(x, y, MultiSimilarityMiner(0.2)(x, y)))


@pytest.mark.parametrize("cls", [ContrastiveLoss, MultiSimilarityLoss])
def test_classes_tiled_path_refuses_what_it_cannot_do(cls: type) -> None:
    x, y = _batch(12, 4, "random", seed=11)
    loss = cls(tiled=True)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(x, y, MultiSimilarityMiner()(x, y))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, y, ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match="at least two"):
        loss(x, torch.zeros_like(y))
    with pytest.raises(ValueError, match="label_comparison"):
        cls(backend="triton", label_comparison=lambda a, b: a[:, None] == b[None, :])
    with pytest.raises(TypeError, match="tiled"):
        cls(tiled=1)
    with pytest.raises(ValueError, match="backend"):
        cls(backend="cuda")
    with pytest.raises(ValueError, match="tile_size"):
        cls(tiled=True, tile_size=0)


# ---------------------------------------------------------------------------------------------------------
# Empty batches: the tiled path answers as the dense path does (warning, count, a zero that keeps the graph).
# ---------------------------------------------------------------------------------------------------------


def _empty_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``mined_away``: tight, far-apart classes (the miner keeps no pair); ``no_positives``: distinct labels."""
    x, y = _batch(24, 8, "separated", seed=6)
    return x, torch.arange(24) if kind == "no_positives" else y


#: (name, the loss class with its arguments, batch kind) of the batches the dense path finds empty. The dense
#: ContrastiveLoss finds a plain batch of two classes never empty (its rule is "no pair at all"), so it has none.
EMPTY_CASES = [
    ("multi_similarity_mined_away", lambda **kw: MultiSimilarityLoss(mining_epsilon=0.1, **kw), "mined_away"),
    ("supcon_no_positives", lambda **kw: SupConLoss(**kw), "no_positives"),
]


def _call(loss: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The loss's value (detached), the gradient of its embeddings and the warnings it gave."""
    leaf = x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = loss(leaf, y)
    value.backward()
    return value.detach(), leaf.grad, [(w.category, str(w.message)) for w in caught]


def _check_empty(make: Callable, kind: str, dtype: torch.dtype = torch.float64, **tiled: Any) -> None:
    x, y = _empty_batch(kind)
    x = x.to(dtype)
    if kind == "mined_away":  # the case is what it claims
        mined = MultiSimilarityMiner(0.1)(x, y)
        assert not bool(mined.positive.any()) and not bool(mined.negative.any())
    dense_loss, tiled_loss = make(), make(**tiled)
    for count in (1, 2):
        dense, tiled_out = _call(dense_loss, x, y), _call(tiled_loss, x, y)
        message = (
            f"no valid pair or triplet in this batch; returning a zero loss ({count} such batches so far)"
        )
        assert dense[2] == [(RuntimeWarning, f"{type(dense_loss).__name__}: {message}")]
        assert tiled_out[2] == dense[2]
        assert dense_loss.num_empty_batches == tiled_loss.num_empty_batches == count
        assert tiled_out[0].dtype == dense[0].dtype and float(tiled_out[0]) == float(dense[0]) == 0.0
        assert tiled_out[1] is not None and torch.equal(tiled_out[1], torch.zeros_like(x))


@pytest.mark.parametrize(("make", "kind"), [c[1:] for c in EMPTY_CASES], ids=[c[0] for c in EMPTY_CASES])
def test_tiled_empty_batch_warns_counts_and_returns_the_dense_zero(make: Callable, kind: str) -> None:
    _check_empty(make, kind, tiled=True, tile_size=8)


def _near_other_class() -> tuple[torch.Tensor, torch.Tensor]:
    """The mined-away batch with sample 0 moved towards class 1: only anchor 0 keeps pairs (a hardest positive
    and a hardest negative within epsilon), every other anchor keeps none."""
    x, y = _empty_batch("mined_away")
    x[0] = torch.eye(8, dtype=x.dtype)[0] + 0.9 * torch.eye(8, dtype=x.dtype)[1]
    return x, y


#: (name, loss class, batch): batches that are not empty, though some give a zero loss
NOT_EMPTY_CASES = [
    # no pair violates a margin: the loss is 0, but the dense rule counts pairs, not violations
    (
        "contrastive_no_violation",
        lambda **kw: ContrastiveLoss(-1.0, 1.0, **kw),
        lambda: _empty_batch("mined_away"),
    ),
    ("multi_similarity_unmined", lambda **kw: MultiSimilarityLoss(**kw), lambda: _empty_batch("mined_away")),
    (
        "multi_similarity_one_anchor",
        lambda **kw: MultiSimilarityLoss(mining_epsilon=0.1, **kw),
        _near_other_class,
    ),
    ("supcon_random", lambda **kw: SupConLoss(**kw), lambda: _batch(20, 6, "singletons", seed=17)),
]


def _check_not_empty(
    make: Callable, data: Callable, dtype: torch.dtype = torch.float64, **tiled: Any
) -> None:
    x, y = data()
    x = x.to(dtype)
    dense_loss, tiled_loss = make(), make(**tiled)
    dense, tiled_out = _call(dense_loss, x, y), _call(tiled_loss, x, y)
    assert dense[2] == tiled_out[2] == []
    assert dense_loss.num_empty_batches == tiled_loss.num_empty_batches == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32: other summation orders (and tf32x3 products)
    torch.testing.assert_close(tiled_out[0], dense[0], rtol=tol, atol=tol)
    torch.testing.assert_close(tiled_out[1], dense[1], rtol=0, atol=tol * float(dense[1].abs().max()) + 1e-10)


@pytest.mark.parametrize(
    ("make", "data"), [c[1:] for c in NOT_EMPTY_CASES], ids=[c[0] for c in NOT_EMPTY_CASES]
)
def test_tiled_batch_that_is_not_empty_does_not_warn(make: Callable, data: Callable) -> None:
    _check_not_empty(make, data, tiled=True, tile_size=8)


def test_one_anchor_keeping_pairs_is_what_the_case_claims() -> None:
    x, y = _near_other_class()
    mined = MultiSimilarityMiner(0.1)(x, y)
    keeps = mined.positive.any(1) | mined.negative.any(1)
    assert keeps.nonzero().flatten().tolist() == [0]
    assert float(MultiSimilarityLoss(mining_epsilon=0.1)(x, y)) > 0


# ---------------------------------------------------------------------------------------------------------
# Bad input: the classes' tiled path refuses what the dense path refuses, with the same error and message.
# ---------------------------------------------------------------------------------------------------------

_X, _Y = torch.randn(6, 4, generator=torch.Generator().manual_seed(18)), torch.tensor([0, 0, 1, 1, 2, 2])
_ONE_CLASS = torch.zeros(6, dtype=torch.int64)
#: name -> (embeddings, labels) the dense path refuses; the pairs of faults check the order of the checks
BAD_BATCHES: dict[str, tuple[Any, Any]] = {
    "nan": (torch.full((6, 4), float("nan")), _Y),
    "inf_row": (_X.index_fill(0, torch.tensor([2]), float("inf")), _Y),
    "not_a_tensor": (_X.tolist(), _Y),
    "one_dim": (_X[0], _Y[:4]),
    "three_dims": (_X[None], _Y),
    "integer_embeddings": (_X.long(), _Y),
    "no_rows": (_X[:0], _Y[:0]),
    "labels_too_short": (_X, _Y[:5]),
    "labels_two_dims": (_X, _Y[:, None]),
    "float_labels": (_X, _Y.float()),
    "one_class": (_X, _ONE_CLASS),
    "one_row": (_X[:1], _Y[:1]),
    "nan_and_one_class": (torch.full((6, 4), float("nan")), _ONE_CLASS),
    "short_one_class_labels": (_X, _ONE_CLASS[:5]),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
@pytest.mark.parametrize("cls", [ContrastiveLoss, MultiSimilarityLoss, SupConLoss])
def test_tiled_path_refuses_bad_input_as_the_dense_path(cls: type, case: str) -> None:
    embeddings, labels = BAD_BATCHES[case]
    with pytest.raises((TypeError, ValueError)) as dense:
        cls()(embeddings, labels)
    with pytest.raises(type(dense.value), match=f"^{re.escape(str(dense.value))}$"):
        cls(tiled=True)(embeddings, labels)


@pytest.mark.parametrize(
    ("embeddings", "labels", "kwargs", "error", "match"),
    [
        (torch.randn(1, 4), torch.zeros(1, dtype=torch.int64), {}, ValueError, "at least 2 rows"),
        (torch.randn(4), torch.zeros(4, dtype=torch.int64), {}, ValueError, "2-D"),
        (torch.randn(5, 4), torch.zeros(4, dtype=torch.int64), {}, ValueError, "labels has 4 entries"),
        (torch.randn(4, 4), torch.zeros(4), {}, TypeError, "integer dtype"),
        (torch.full((4, 4), float("nan")), torch.zeros(4, dtype=torch.int64), {}, ValueError, "NaN"),
        (torch.randn(4, 4), torch.zeros(4, dtype=torch.int64), {"tile_size": 0}, ValueError, "tile_size"),
        (torch.randn(4, 4), torch.zeros(4, dtype=torch.int64), {"backend": "gpu"}, ValueError, "backend"),
        (torch.randn(4, 4), torch.zeros(4, dtype=torch.int64), {"pos_margin": 2.0}, ValueError, "pos_margin"),
        (torch.randn(4, 4), torch.zeros(4, dtype=torch.int64), {"reduction": "max"}, ValueError, "reduction"),
    ],
)
def test_bad_input_is_refused(
    embeddings: torch.Tensor, labels: torch.Tensor, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        tiled_contrastive_loss(embeddings, labels, **kwargs)


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (tiled_multi_similarity_loss, {"alpha": 0.0}, "alpha"),
        (tiled_multi_similarity_loss, {"mining_epsilon": -0.1}, "mining_epsilon"),
        (tiled_supcon_loss, {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_parameters_are_refused(fn: Callable, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), **kwargs)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tiled_supcon_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), backend="triton")


# ---------------------------------------------------------------------------------------------------------
# Memory: the largest tensor any op of the tiled forward + backward allocates.
# ---------------------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest storage any op returns (forward and backward ops alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _largest_allocation(loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> int:
    x = x.clone().requires_grad_()
    with _LargestTensor() as meter:
        loss_fn(x, y).backward()
    assert x.grad is not None and bool(x.grad.any())
    return meter.largest


def test_tiled_forward_and_backward_stay_far_below_the_dense_matrix() -> None:
    num, dim = 4096, 64
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(num, dim, generator=g), torch.randint(0, 512, (num,), generator=g)
    dense_matrix = num * num * 4  # the (B, B) float32 similarities: 64 MiB
    tiled = _largest_allocation(lambda e, t: tiled_multi_similarity_loss(e, t, mining_epsilon=0.1), x, y)
    assert tiled <= dense_matrix // 8, (tiled, dense_matrix)
    # the meter sees a dense loss's (B, B) matrix (on a smaller batch, to stay quick)
    small = 1024
    dense = _largest_allocation(lambda e, t: MultiSimilarityLoss()(e, t), x[:small], y[:small])
    assert dense >= small * small * 4


# ---------------------------------------------------------------------------------------------------------
# Triton under the interpreter, in one subprocess.
# ---------------------------------------------------------------------------------------------------------

#: (name, B, D, labels, tile_size, dtype): column and feature tails, a tile above B, no positives, no negatives
TRITON_CASES = [
    ("tails_f32", 37, 20, "singletons", 16, torch.float32),
    ("tile_above_batch_f16", 13, 40, "random", 64, torch.float16),
    ("mined_away_f32", 18, 16, "separated", 16, torch.float32),
    ("one_class_f16", 17, 8, "one_class", 16, torch.float16),
]
TRITON_LOSSES = ["contrastive_mean", "multi_similarity_mined", "multi_similarity", "supcon"]


def _check_triton_case(case: tuple) -> None:
    name, num, dim, kind, tile, dtype = case
    x, y = _batch(num, dim, kind, seed=13)
    if kind == "one_class":
        y = torch.zeros_like(y)  # no negative pair
    for loss in TRITON_LOSSES:
        fn, kwargs, _ = LOSSES[loss]
        a, b = x.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()
        kernel = fn(a, y, tile_size=tile, backend="triton", **kwargs)
        reference = fn(b, y, tile_size=tile, backend="torch", **kwargs)
        assert kernel.dtype == torch.float32, (name, loss)
        where = f"{name} {loss}"
        torch.testing.assert_close(
            kernel, reference, rtol=1e-5, atol=1e-6, msg=lambda m, w=where: f"{w}: {m}"
        )
        kernel.backward()
        reference.backward()
        assert a.grad is not None and b.grad is not None and a.grad.dtype == dtype
        # float32 sums in another order (float16 gradients also round to 11 bits), and an absolute floor
        # for the float32 cancellation of gradients of nearly coincident points
        scale = float(b.grad.abs().max())
        atol = (1e-3 if dtype == torch.float16 else 1e-5) * scale + 1e-7
        torch.testing.assert_close(
            a.grad.float(), b.grad.float(), rtol=0, atol=atol, msg=lambda m, w=where: f"{w}: {m}"
        )


def triton_checks() -> None:
    """Every Triton case; run by :func:`test_triton_kernels_under_interpreter` in a subprocess."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in TRITON_CASES:
        _check_triton_case(case)
    import objretrieval.kernels.pairwise_losses as kernels

    kernels._MAX_BLOCK_D = 16  # several feature blocks in the gradient programs' grid, the last one a tail
    _check_triton_case(("feature_blocks_f32", 19, 40, "random", 16, torch.float32))
    x, y = _batch(21, 12, "singletons", seed=16)
    for cls in (ContrastiveLoss, MultiSimilarityLoss):  # the classes route to the kernel
        kernel = cls(backend="triton", tile_size=16)(x.float(), y)
        torch.testing.assert_close(kernel, cls(tiled=True)(x.float(), y), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="float32"):
        tiled_supcon_loss(
            torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1]), backend="triton"
        )
    for _, make, kind in EMPTY_CASES:  # the kernel's statistics decide emptiness as the torch tiles' do
        _check_empty(make, kind, torch.float32, backend="triton", tile_size=16)
    for _, make, data in NOT_EMPTY_CASES:
        _check_not_empty(make, data, torch.float32, backend="triton", tile_size=16)
    print("triton checks passed:", TRITON_CHECKS)


#: what triton_checks runs: the cases, the dtype refusal, the empty and not-empty batches
TRITON_CHECKS = len(TRITON_CASES) + 1 + len(EMPTY_CASES) + len(NOT_EMPTY_CASES)


def test_triton_kernels_under_interpreter() -> None:
    out = run_interpreted("from tests.test_kernels_pairwise_losses import triton_checks; triton_checks()")
    assert f"triton checks passed: {TRITON_CHECKS}" in out


#: (kernel, constexpr values): every branch of both kernels, LOSS 0 contrastive, 1 multi-similarity, 2 SupCon,
#: 3 the miner's statistics
COMPILED = [
    ("_stats_tile", {"LOSS": 0, "MINED": False, "WIDTH": 6}),
    ("_stats_tile", {"LOSS": 1, "MINED": True, "WIDTH": 2}),
    ("_stats_tile", {"LOSS": 2, "MINED": False, "WIDTH": 3}),
    ("_stats_tile", {"LOSS": 3, "MINED": False, "WIDTH": 2}),
    ("_grad_tile", {"LOSS": 0, "MINED": False, "WIDTH": 2, "TRANSPOSED": False}),
    ("_grad_tile", {"LOSS": 1, "MINED": True, "WIDTH": 3, "TRANSPOSED": True}),
    ("_grad_tile", {"LOSS": 2, "MINED": False, "WIDTH": 3, "TRANSPOSED": False}),
]


def compile_for_sm90() -> None:
    """Compile the kernels to an H100/H200 binary without a GPU (what the interpreter cannot prove: that the
    Triton compiler accepts them); run by :func:`test_kernels_compile_for_sm90` in a subprocess."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import objretrieval.kernels.pairwise_losses as kernels

    pointers = {"e_ptr": "*fp32", "y_ptr": "*i64", "mining_ptr": "*fp32"}
    scalars = {"n": "i32", "d": "i32", "p0": "fp32", "p1": "fp32", "p2": "fp32", "p3": "fp32"}
    signatures = {
        "_stats_tile": {**pointers, "out_ptr": "*fp32", **scalars},
        "_grad_tile": {**pointers, "c_ptr": "*fp32", "out_ptr": "*fp32", **scalars, "scale": "fp32"},
    }
    blocks = {
        "BLOCK": kernels.MAX_TRITON_TILE,
        "BLOCK_K": kernels._BLOCK_K,
        "PAIRS": triton.jit(kernels._pair_tile),
    }
    for name, constants in COMPILED:
        constants = {**constants, **blocks, **({"BLOCK_D": 128} if name == "_grad_tile" else {})}
        signature = {**signatures[name], **dict.fromkeys(constants, "constexpr")}
        source = ASTSource(triton.jit(getattr(kernels, name)), signature, constants)
        options = {"num_warps": kernels._GRAD_WARPS if name == "_grad_tile" else 4}
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"], name
    print("compiled:", len(COMPILED))


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = "from tests.test_kernels_pairwise_losses import compile_for_sm90; compile_for_sm90()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"compiled: {len(COMPILED)}" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("loss", TRITON_LOSSES)
def test_cuda_half_inputs_match_torch_tiles(loss: str, dtype: torch.dtype) -> None:
    fn, kwargs, dense = LOSSES[loss]
    x, y = _batch(1000, 96, "singletons", seed=14)
    x, y = x.to("cuda", dtype), y.cuda()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    kernel, reference = fn(a, y, backend="triton", **kwargs), fn(b, y, backend="torch", **kwargs)
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, dense(x, y), rtol=1e-5, atol=1e-5)
    kernel.backward()
    reference.backward()
    assert a.grad is not None and b.grad is not None
    scale = float(b.grad.abs().max().float())
    torch.testing.assert_close(a.grad.float() / scale, b.grad.float() / scale, rtol=0, atol=1e-2)
