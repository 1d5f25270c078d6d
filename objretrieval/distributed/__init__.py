"""Training and evaluation across processes on ``torch.distributed`` (gloo on CPU, nccl on GPUs).

- :class:`DistributedLoss`: a metric loss on the global batch (``mode="global"``) or this rank's rows against
  it (``mode="local"``), with gradients scaled for DDP; :class:`~objretrieval.losses.CrossBatchMemory` keeps
  the identical queue on every rank.
- :func:`sharded_knn` (also ``objretrieval.knn(..., group=)``): exact kNN over a gallery sharded across ranks,
  bit-identical to one process; :class:`~objretrieval.metrics.RetrievalMetrics` evaluates on it.
- :func:`all_gather_with_grad`: every rank's rows (uneven sizes allowed), gradients flowing back to their
  owner; :func:`all_gather_uneven`, :func:`all_reduce_sum_`, :func:`all_reduce_mean_`: without gradient.
- :func:`shard_range`: this rank's contiguous share of a list of items (sharded extraction, scoring).
- :func:`check_on_every_rank`: argument checks whose failure on one rank raises on all of them.
- :func:`is_distributed`, :func:`world_size`, :func:`rank`: the process group as every module sees it.

Objects of this package use the default process group unless given ``group=``. Functions of the
single-process API (``knn``, ``score_shortlist``, ``pairwise_knn``, ``RetrievalEvaluator.from_scorer``) shard
only when given ``group=``: pass ``torch.distributed.group.WORLD``, which is None outside a process group, so
the same call then runs in one process.
"""

from objretrieval.distributed.gather import all_gather_with_grad
from objretrieval.distributed.knn import sharded_knn
from objretrieval.distributed.loss import DistributedLoss
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    all_reduce_mean_,
    all_reduce_sum_,
    check_on_every_rank,
    is_distributed,
    rank,
    shard_offsets,
    shard_range,
    world_size,
)
from objretrieval.losses.cross_batch_memory import CrossBatchMemory

__all__ = [
    "CrossBatchMemory",
    "DistributedLoss",
    "Group",
    "all_gather_uneven",
    "all_gather_with_grad",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "check_on_every_rank",
    "is_distributed",
    "rank",
    "shard_offsets",
    "shard_range",
    "sharded_knn",
    "world_size",
]
