"""Losses on pairwise match logits (one logit per (query, database) pair), as AMES is trained.

The AMES paper trains the full-precision model with binary cross-entropy on pair labels and the binarized
student with the same loss plus distillation from the full-precision teacher's logits; the official repository
ships neither. :class:`PairBCELoss` is the former, :class:`PairDistillationLoss` the combination.

Both follow the library's dtype rule (:mod:`objretrieval.precision`): float32, or float64 for float64 logits,
with autocast disabled, so they are safe inside a mixed-precision training step. NaN/inf logits are refused.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_choice, check_finite_values, check_number
from objretrieval.display import ConfigRepr
from objretrieval.precision import compute_dtype, full_precision, upcast

Reduction = Literal["mean", "sum", "none"]


def _check_logits(logits: object, name: str) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 1 or logits.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty (B,) tensor of pair logits, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {logits.dtype}")
    check_finite_values(logits[:, None], name)  # one row per pair: the error names the pair
    return logits


def _check_targets(targets: object, logits: Tensor, name: str) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"{name} must have the logits' shape {tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    targets = targets.to(logits.device)
    dtype = compute_dtype(logits)
    if targets.dtype == torch.bool:
        return targets.to(dtype)
    if targets.is_floating_point() and not ((targets >= 0) & (targets <= 1)).all():  # NaN fails this too
        raise ValueError(f"{name} must lie in [0, 1] (1 = matching pair)")
    if not targets.is_floating_point() and not ((targets == 0) | (targets == 1)).all():
        raise ValueError(f"integer {name} must be 0 or 1 (1 = matching pair)")
    return targets.to(dtype)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


class PairBCELoss(ConfigRepr, nn.Module):
    """Binary cross-entropy on pair logits: ``-[y log s(x) + (1 - y) log(1 - s(x))]``.

    Args:
        pos_weight: weight of the positive term (e.g. the negative-to-positive ratio of the pair sampler).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per pair).

    Shapes:
        logits: (B,) raw scores (``AMES(...)`` output). targets: (B,) bool, 0/1 integers or soft floats in [0, 1].
    """

    def __init__(self, pos_weight: float | None = None, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.pos_weight = (
            None if pos_weight is None else check_number(pos_weight, "pos_weight", low=0.0, low_open=True)
        )
        self.reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = _check_logits(logits, "logits")
        targets = _check_targets(targets, logits, "targets")
        with full_precision(logits.device):
            x = upcast(logits)
            pos_weight = None if self.pos_weight is None else x.new_tensor(self.pos_weight)
            loss = F.binary_cross_entropy_with_logits(x, targets, pos_weight=pos_weight, reduction="none")
        return _reduce(loss, self.reduction)


class PairDistillationLoss(ConfigRepr, nn.Module):
    """``alpha * BCE(student, labels) + (1 - alpha) * distillation(student, teacher)`` on pair logits.

    For training the binarized AMES student from a frozen full-precision teacher on the same pairs.

    Args:
        alpha: weight of the label term (ignored, i.e. pure distillation, when no labels are given).
        temperature: both logits are divided by it; the soft term is scaled by ``temperature ** 2`` so its
            gradient keeps its magnitude (Hinton et al.).
        kind: ``"soft_bce"``: cross-entropy against the teacher's match probability ``sigmoid(t / T)``;
            ``"mse"``: squared difference of the logits.
        pos_weight: weight of positives in the label term.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes:
        student, teacher: (B,) logits. targets: optional (B,) pair labels (see :class:`PairBCELoss`).
    """

    config_attributes: ClassVar[dict[str, str | None]] = {"pos_weight": "hard.pos_weight"}  # the label term's

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 1.0,
        kind: Literal["soft_bce", "mse"] = "soft_bce",
        pos_weight: float | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:  # NaN too; the message is what tests/test_losses.py matches
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        self.kind = check_choice(kind, "kind", ("soft_bce", "mse"))
        self.reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))
        self.hard = PairBCELoss(pos_weight, reduction="none")

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        student = _check_logits(student, "student")
        teacher = _check_logits(teacher, "teacher")
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}"
            )
        t = self.temperature
        with full_precision(student.device):
            dtype = compute_dtype(student, teacher)
            s, te = upcast(student, dtype) / t, upcast(teacher.detach().to(student.device), dtype) / t
            if self.kind == "soft_bce":
                soft = F.binary_cross_entropy_with_logits(s, torch.sigmoid(te), reduction="none")
            else:
                soft = (s - te) ** 2
            loss = soft * t * t
            if targets is not None:
                loss = self.alpha * self.hard(student, targets) + (1.0 - self.alpha) * loss
        return _reduce(loss, self.reduction)
