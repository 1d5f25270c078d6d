"""Gathering a batch from every rank with its gradient path kept (open_clip's ``gather_with_grad``).

:func:`all_gather_with_grad` returns the rows of every rank, concatenated in rank order (sizes may differ:
each rank's rows are padded to the largest size for the exchange and unpadded after). In the backward pass
the gradient of the concatenation is summed over ranks (``all_reduce``) and each rank keeps the slice of its
own rows:

    grad x_r = sum over ranks s of  d L_s / d x_r

where ``L_s`` is what rank ``s`` backpropagates. When every rank computes the same function of the gathered
batch (``DistributedLoss(mode="global")``), that sum is ``world_size * dL/dx_r``, and DDP's averaging of the
parameter gradients divides the world size out again: each parameter ends with the gradient of one process
on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from objretrieval.distributed.world import (
    Group,
    comm_device,
    gather_padded,
    gather_row_counts,
    shard_offsets,
    world_size,
)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group, name: str) -> Tensor:
        sizes = gather_row_counts(x, name, group)
        ctx.group, ctx.sizes = group, sizes
        ctx.rank = dist.get_rank(group)
        return torch.cat(gather_padded(x, sizes, group))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous()
        total = grad.to(comm_device(grad, ctx.group), copy=True)
        dist.all_reduce(total, group=ctx.group)
        start = shard_offsets(ctx.sizes)[ctx.rank]
        return total[start : start + ctx.sizes[ctx.rank]].to(grad.device), None, None


def all_gather_with_grad(x: Tensor, group: Group = None, *, name: str = "x") -> Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, differentiable (see the module docstring).

    Args:
        x: (n_r, ...) this rank's rows; ``n_r`` may differ between ranks (0 included), the other
            dimensions and the dtype may not.
        group: process group (default: the default group).
        name: what ``x`` is, for the error raised when ranks disagree on its trailing shape or dtype.

    Returns:
        (sum of n_r, ...) on ``x``'s device; this rank's rows are ``x`` itself in value, and gradients reaching
        any slice of the result flow back to the rank that owns it. Outside ``torch.distributed`` (or in a
        world of one) ``x`` is returned unchanged.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group, name)
