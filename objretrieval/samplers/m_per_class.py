"""``MPerClassSampler``: batches of ``batch_size // m`` distinct classes with ``m`` samples each.

This is the class-balanced ("P x K") batch construction used to train deep metric learning losses, e.g. the
IPC ``BalancedSampler`` and the ``RandomSampler`` of the contextual-similarity paper (Liao et al., ICML 2023).
Unlike those, every sample is seen at least once per epoch, the batches depend only on ``(seed, epoch)`` and
the sampler splits the batches between DDP ranks itself.

```python
from torch.utils.data import DataLoader
from objretrieval.samplers import MPerClassSampler

sampler = MPerClassSampler(train_labels, batch_size=128, m=4, seed=0)
loader = DataLoader(train_set, batch_sampler=sampler, num_workers=8)
for epoch in range(epochs):
    sampler.set_epoch(epoch)
    for images, labels in loader:
        ...
```
"""

from __future__ import annotations

from typing import Any

import numpy as np

from objretrieval.samplers._common import (
    ChunkBatchSampler,
    ClassTable,
    IntArray,
    SmallClasses,
    as_label_array,
    check_sizes,
)


class MPerClassSampler(ChunkBatchSampler):
    """Batch sampler yielding ``batch_size // m`` distinct classes x ``m`` indices per batch.

    Each epoch the members of every class are shuffled and cut into chunks of ``m`` (the last chunk of a class
    is completed with other members of that class, never repeating an index within the chunk). The chunks are
    spread over the batches so that no batch holds a class twice; batch slots left over are filled with
    freshly drawn chunks of classes not yet in the batch. Hence every sample of a kept class appears at least
    once per epoch (over all ranks), and the number of batches per epoch is::

        num_batches = max(ceil(T / (batch_size // m)), max_c ceil(n_c / m)),   T = sum_c ceil(n_c / m)

    over the kept classes ``c`` with ``n_c`` samples. A class with many more samples than the others therefore
    lengthens the epoch: it can contribute at most one chunk per batch.

    Within a batch the ``m`` indices of a class are contiguous; the class order in a batch and the batch order
    are random. Batches depend only on ``(seed, epoch, labels, batch_size, m, small_classes)``: the sampler
    draws from its own ``numpy.random.Generator`` seeded with ``[seed, epoch]`` and never touches the global
    numpy or torch generators. Call :meth:`set_epoch` before each epoch to get new batches.

    Distributed training: every rank computes the same global batch list and rank ``r`` takes batches
    ``r, r + world_size, ...``; the list is padded by wrapping around to its start, so every rank yields
    ``len(sampler) = ceil(num_batches / world_size)`` batches and collective ops do not hang.

    Classes with fewer than ``m`` samples are handled by ``small_classes``:

    * ``"error"`` (default): raise ``ValueError`` saying how many classes are too small and the smallest size;
    * ``"replace"``: such a class gives all its samples plus random repeats of them to reach ``m``;
    * ``"drop"``: such classes are never sampled.

    Args:
        labels: (N,) integer class label of each dataset sample (list, numpy array or tensor; any integer
            values, they need not be ``0..C-1``).
        batch_size: indices per batch; a multiple of ``m``.
        m: samples per class in a batch.
        seed: non-negative base seed of the per-epoch generator; use the same on every rank.
        small_classes: policy for classes with fewer than ``m`` samples (see above).
        rank: this process's rank; default ``torch.distributed.get_rank()`` when initialised, else 0.
        world_size: number of ranks; default ``torch.distributed.get_world_size()`` when initialised, else 1.

    Raises:
        TypeError: ``labels`` is not an integer array, or an argument is not an int.
        ValueError: bad sizes, ``batch_size`` not divisible by ``m``, fewer than ``batch_size // m`` classes,
            a class smaller than ``m`` with ``small_classes="error"``, or ``rank`` outside
            ``[0, world_size)``.

    Example:
        ```python
        >>> sampler = MPerClassSampler([0, 0, 1, 1, 2, 2, 3, 3], batch_size=4, m=2)
        >>> len(sampler)
        2
        >>> [len(batch) for batch in sampler]
        [4, 4]
        ```
    """

    def __init__(
        self,
        labels: Any,
        batch_size: int,
        m: int,
        *,
        seed: int = 0,
        small_classes: SmallClasses = "error",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed, rank, world_size)
        self.batch_size, self.m = check_sizes(batch_size, m, "batch", divisor=1)
        self.classes_per_batch = self.batch_size // self.m
        self.small_classes = small_classes
        self._set_labels(labels)

    def _set_labels(self, labels: Any) -> None:
        """Validate ``labels`` and derive the class table; the sampler changes only if all checks pass."""
        values = as_label_array(labels, "labels")
        table = ClassTable.from_labels(values, self.m, self.small_classes)
        if table.num_classes < self.classes_per_batch:
            raise ValueError(
                f"labels has {table.num_classes} classes{table.describe_drop()}, but a batch "
                f"of batch_size={self.batch_size} with m={self.m} needs {self.classes_per_batch} distinct "
                "classes"
            )
        chunks = table.chunks_per_class
        self.labels, self.table = values, table
        self.num_batches = max(-(-int(chunks.sum()) // self.classes_per_batch), int(chunks.max()))

    def _num_global_batches(self) -> int:
        return self.num_batches

    def _global_batches(self, rng: np.random.Generator) -> IntArray:
        shuffled = self.table.shuffled_members(rng)
        every_class = np.arange(self.table.num_classes)
        batches = self.table.build_groups(
            every_class, self.num_batches, self.classes_per_batch, shuffled, rng
        )
        return batches[rng.permutation(self.num_batches)]
