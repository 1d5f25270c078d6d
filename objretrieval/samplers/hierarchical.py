"""``HierarchicalSampler``: batches made of two half-batches from two different super-labels.

This is the batch construction of the hierarchical (super-label) sampler of ROADMAP / contextual similarity
(Liao et al., ICML 2023) for datasets with a class hierarchy such as Stanford Online Products or iNaturalist:
each half of a batch holds ``(batch_size // 2) // m`` classes of one super-label with ``m`` samples each, so a
batch contrasts fine-grained classes within a super-label and across two super-labels. Unlike the official
sampler, every sample is seen at least once per epoch, the batches depend only on ``(seed, epoch)`` and the
sampler splits the batches between DDP ranks itself.

```python
from torch.utils.data import DataLoader
from objretrieval.samplers import HierarchicalSampler

sampler = HierarchicalSampler(train_labels, train_super_labels, batch_size=128, m=4, seed=0)
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

_LISTED = 5  # offending classes / super-labels named in an error message


class HierarchicalSampler(ChunkBatchSampler):
    """Batch sampler: two halves of ``batch_size // 2`` indices from two different super-labels per batch.

    Each half holds ``(batch_size // 2) // m`` distinct classes of one super-label with ``m`` contiguous
    indices each; the two halves come from different super-labels. Each class must belong to a single
    super-label.

    Each epoch, per super-label, the members of its classes are shuffled and cut into chunks of ``m`` (the
    last chunk of a class is completed with other members of that class, never repeating an index within the
    chunk) and the chunks are spread over ``H_s`` half-batches so that no half holds a class twice; leftover
    slots are filled with freshly drawn chunks of other classes of the super-label. With ``T_s`` chunks in
    super-label ``s`` and ``P = (batch_size // 2) // m``::

        H_s = max(ceil(T_s / P), max_{c in s} ceil(n_c / m)),   H = sum_s H_s
        num_batches = max(ceil(H / 2), max_s H_s)

    The half-batches are then paired so that the two halves of a batch come from different super-labels: as
    long as one super-label holds the most halves, one of its halves is paired with a half of another
    super-label drawn with probability proportional to the halves it has left. Half-batches that cannot be
    paired this way (one super-label holds more than all others together, or ``H`` is odd) are paired with
    freshly drawn half-batches of the other super-labels, chosen with probability proportional to their number
    of samples. Hence every sample of a kept class appears at least once per epoch (over all ranks). The order
    of the halves within a batch and the batch order are random.

    Batches depend only on ``(seed, epoch, labels, super_labels, batch_size, m, small_classes)``: the sampler
    draws from its own ``numpy.random.Generator`` seeded with ``[seed, epoch]`` and never touches the global
    numpy or torch generators. Call :meth:`set_epoch` before each epoch to get new batches.

    Distributed training: every rank computes the same global batch list and rank ``r`` takes batches
    ``r, r + world_size, ...``; the list is padded by wrapping around to its start, so every rank yields
    ``len(sampler) = ceil(num_batches / world_size)`` batches and collective ops do not hang.

    Classes with fewer than ``m`` samples are handled by ``small_classes``:

    * ``"error"`` (default): raise ``ValueError`` saying how many classes are too small and the smallest size;
    * ``"replace"``: such a class gives all its samples plus random repeats of them to reach ``m`` (what the
      official sampler does);
    * ``"drop"``: such classes are never sampled.

    Args:
        labels: (N,) integer class label of each dataset sample (list, numpy array or tensor; any integer
            values).
        super_labels: (N,) integer super-label of each sample; constant within a class; at least two distinct
            values, each with at least ``(batch_size // 2) // m`` classes after the small-class policy.
        batch_size: indices per batch; a multiple of ``2 * m``.
        m: samples per class in a half-batch.
        seed: non-negative base seed of the per-epoch generator; use the same on every rank.
        small_classes: policy for classes with fewer than ``m`` samples (see above).
        rank: this process's rank; default ``torch.distributed.get_rank()`` when initialised, else 0.
        world_size: number of ranks; default ``torch.distributed.get_world_size()`` when initialised, else 1.

    Raises:
        TypeError: ``labels`` or ``super_labels`` is not an integer array, or an argument is not an int.
        ValueError: bad sizes, ``batch_size`` not divisible by ``2 * m``, ``super_labels`` of the wrong length
            or not constant within a class, fewer than two super-labels, a super-label with too few classes, a
            class smaller than ``m`` with ``small_classes="error"``, or ``rank`` outside ``[0, world_size)``.

    Example:
        >>> labels = [0, 0, 1, 1, 2, 2, 3, 3]
        >>> super_labels = [0, 0, 0, 0, 1, 1, 1, 1]
        >>> sampler = HierarchicalSampler(labels, super_labels, batch_size=4, m=2)
        >>> len(sampler)
        2
    """

    def __init__(
        self,
        labels: Any,
        super_labels: Any,
        batch_size: int,
        m: int,
        *,
        seed: int = 0,
        small_classes: SmallClasses = "error",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed, rank, world_size)
        self.batch_size, self.m = check_sizes(batch_size, m, "half-batch", divisor=2)
        self.classes_per_half = self.batch_size // 2 // self.m
        self.labels = as_label_array(labels, "labels")
        self.super_labels = as_label_array(
            super_labels, "super_labels", length=self.labels.size, length_of="labels"
        )
        self.small_classes = small_classes
        _check_nested(self.labels, self.super_labels)
        self.super_values = np.unique(self.super_labels)
        if self.super_values.size < 2:
            raise ValueError(
                f"super_labels has {self.super_values.size} distinct value ({self.super_values[0]}), but the "
                "two halves of every batch must come from different super-labels: at least 2 are needed"
            )
        self.table = ClassTable.from_labels(self.labels, self.m, small_classes)
        table = self.table
        class_super = np.searchsorted(self.super_values, self.super_labels[table.members[table.offsets]])
        num_supers = self.super_values.size
        classes_in_super = np.bincount(class_super, minlength=num_supers)
        too_few = np.flatnonzero(classes_in_super < self.classes_per_half)
        if too_few.size:
            listed = ", ".join(
                f"super-label {self.super_values[s]} has {classes_in_super[s]}" for s in too_few[:_LISTED]
            )
            raise ValueError(
                f"every super-label needs at least (batch_size // 2) // m = {self.classes_per_half} classes "
                f"to fill a half-batch with distinct classes (batch_size={self.batch_size}, m={self.m}), but "
                f"{too_few.size} of {num_supers} super-labels have fewer{table.describe_drop()}: {listed}"
                + (", ..." if too_few.size > _LISTED else "")
            )
        by_super = np.argsort(class_super, kind="stable")
        self.classes_of_super: list[IntArray] = np.split(by_super, np.cumsum(classes_in_super)[:-1])
        chunks = table.chunks_per_class
        chunks_in_super = np.bincount(class_super, weights=chunks, minlength=num_supers).astype(np.int64)
        most_chunks_of_a_class = np.zeros(num_supers, dtype=np.int64)
        np.maximum.at(most_chunks_of_a_class, class_super, chunks)
        self.halves_per_super = np.maximum(
            -(-chunks_in_super // self.classes_per_half), most_chunks_of_a_class
        )
        self.samples_per_super = np.bincount(class_super, weights=table.sizes, minlength=num_supers)
        total, largest = int(self.halves_per_super.sum()), int(self.halves_per_super.max())
        # fresh halves needed so that a pairing across super-labels exists: an even total and no super-label
        # with more than half of all halves
        self.fresh_halves = max(2 * largest - total, total % 2)
        self.num_batches = (total + self.fresh_halves) // 2

    def _num_global_batches(self) -> int:
        return self.num_batches

    def _global_batches(self, rng: np.random.Generator) -> IntArray:
        shuffled = self.table.shuffled_members(rng)
        rows = self.halves_per_super.copy()
        if self.fresh_halves:
            # never the super-label with the most halves: it may be the one that needs partners
            others = np.delete(np.arange(rows.size), int(np.argmax(rows)))
            weights = self.samples_per_super[others] / self.samples_per_super[others].sum()
            rows += np.bincount(rng.choice(others, size=self.fresh_halves, p=weights), minlength=rows.size)
        halves = np.concatenate(
            [
                self.table.build_groups(classes, int(n), self.classes_per_half, shuffled, rng)
                for classes, n in zip(self.classes_of_super, rows, strict=True)
            ]
        )
        half_super = np.repeat(np.arange(rows.size), rows)
        pairs = pair_across_groups(rows, rng)  # (num_batches, 2) super-label of each half
        # the k-th use of super-label s takes the k-th of its halves in a random order
        halves_by_super = np.lexsort((rng.random(half_super.size), half_super))
        slots = np.empty(half_super.size, dtype=np.int64)
        slots[np.argsort(pairs.ravel(), kind="stable")] = halves_by_super
        half_of_slot = slots.reshape(-1, 2)
        swap = rng.random(half_of_slot.shape[0]) < 0.5  # which super-label comes first is random
        half_of_slot[swap] = half_of_slot[swap, ::-1]
        batches = halves[half_of_slot].reshape(-1, self.batch_size)
        return batches[rng.permutation(batches.shape[0])]


def _check_nested(labels: IntArray, super_labels: IntArray) -> None:
    """Raise unless every class has a single super-label."""
    order = np.lexsort((super_labels, labels))
    same_class = labels[order][1:] == labels[order][:-1]
    split = same_class & (super_labels[order][1:] != super_labels[order][:-1])
    if split.any():
        bad_classes = np.unique(labels[order][1:][split])
        first = int(bad_classes[0])
        supers = np.unique(super_labels[labels == first])
        raise ValueError(
            f"super_labels must be constant within each class, but {bad_classes.size} classes span several "
            f"super-labels (e.g. class {first} has super-labels {supers[:_LISTED].tolist()})"
        )


def pair_across_groups(counts: IntArray, rng: np.random.Generator) -> IntArray:
    """Pair ``sum(counts)`` items of ``len(counts)`` groups so that no pair holds two items of one group.

    Greedy: the group with the most items left (ties broken at random) is paired with another group drawn with
    probability proportional to its items left. This never gets stuck when the total is even and no group
    holds more than half of the items, which stays true after every step.

    Args:
        counts: (G,) items per group; even total, ``max(counts) <= sum(counts) / 2``.
        rng: generator.

    Returns:
        (sum(counts) // 2, 2) int64 group ids of the two items of each pair.
    """
    left = counts.astype(np.int64)
    total = int(left.sum())
    assert total % 2 == 0 and 2 * int(left.max()) <= total, counts
    pairs = np.empty((total // 2, 2), dtype=np.int64)
    draws = rng.random((total // 2, 2))
    for t in range(total // 2):
        tied = np.flatnonzero(left == left.max())
        first = tied[int(draws[t, 0] * tied.size)]
        left[first] -= 1
        weights = left.copy()
        weights[first] = 0
        cumulative = np.cumsum(weights)
        second = int(np.searchsorted(cumulative, draws[t, 1] * cumulative[-1], side="right"))
        left[second] -= 1
        pairs[t] = first, second
    return pairs
