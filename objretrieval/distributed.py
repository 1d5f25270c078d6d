"""torch.distributed, seen the same way everywhere: one place that asks whether processes cooperate.

Every module that reduces state across processes (DINO's centre, AVSL's link statistics, the samplers' shard
of each batch) goes through these functions, so "not initialised" and "a world of one" mean the same thing
in all of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a default process group is initialised (a world of one counts: collectives are then no-ops)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group, 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group, 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_reduce_mean_(t: Tensor) -> Tensor:
    """Replace ``t`` in place by its mean over all processes (unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return t


@torch.no_grad()
def all_reduce_sum_(t: Tensor) -> Tensor:
    """Replace ``t`` in place by its sum over all processes (unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t
