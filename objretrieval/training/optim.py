"""Optimiser plumbing shared by self-supervised training: parameter groups, clipping, EMA teachers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from objretrieval._validation import check_number


def weight_decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's two AdamW groups over the trainable parameters: decayed, and not decayed (biases and 1-D
    tensors). 0-d scalars (MILE's ``gate_alpha``) are decayed, as in the official code.

    The first group carries ``"regularized": True`` so that a weight-decay schedule knows where to apply.
    """
    decayed: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if name.endswith(".bias") or param.ndim == 1 else decayed).append(param)
    return [
        {"params": decayed, "regularized": True},
        {"params": plain, "weight_decay": 0.0, "regularized": False},
    ]


@torch.no_grad()
def clip_gradients_per_tensor(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to it (DINO's ``clip_gradients``;
    not a global-norm clip). Returns the norms before clipping, without a host sync."""
    check_number(max_norm, "max_norm", low=0.0, low_open=True)  # <= 0 would zero or flip every gradient
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return torch.stack(norms)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for the student's trainable parameters,
    matched by name (the frozen ones are equal by construction and left alone)."""
    check_number(momentum, "momentum", low=0.0, high=1.0)
    teacher_params = dict(teacher.named_parameters())
    trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    missing = [n for n, _ in trained if n not in teacher_params]
    if missing:
        raise ValueError(f"teacher has no parameters named {missing[:5]} (student and teacher must match)")
    t: list[Tensor] = [teacher_params[n] for n, _ in trained]
    s: list[Tensor] = [p for _, p in trained]
    if t:
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)
