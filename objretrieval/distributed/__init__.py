"""Training and evaluation across processes on ``torch.distributed`` (gloo on CPU, nccl on GPUs).

- :func:`all_gather_with_grad`: every rank's rows (uneven sizes allowed), gradients flowing back to their owner.
- :func:`all_gather_uneven`, :func:`all_reduce_sum_`, :func:`all_reduce_mean_`: the exchanges without gradient.
- :func:`is_distributed`, :func:`world_size`, :func:`rank`: the process group as every module sees it.
"""

from objretrieval.distributed.gather import all_gather_with_grad
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    all_reduce_mean_,
    all_reduce_sum_,
    is_distributed,
    rank,
    shard_offsets,
    world_size,
)

__all__ = [
    "Group",
    "all_gather_uneven",
    "all_gather_with_grad",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "is_distributed",
    "rank",
    "shard_offsets",
    "world_size",
]
