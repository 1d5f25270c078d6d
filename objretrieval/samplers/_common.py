"""Machinery shared by the class-balanced batch samplers.

Both samplers work on *chunks*: a chunk is ``m`` indices of one class, and a batch (or half-batch) is a row of
chunks of pairwise distinct classes. Every epoch:

1. the members of each class are shuffled (:meth:`ClassTable.shuffled_members`);
2. each class of ``n`` members is cut into ``ceil(n / m)`` chunks of that shuffled order; the last chunk is
   padded with the first members of the order, which are not in it, so no index repeats inside a chunk;
3. the chunks are laid out column by column into a (rows, width) grid (:func:`layout_chunks`): the chunks of a
   class are consecutive in that order and a class never has more chunks than there are rows, so no row holds
   a class twice. Grid cells left empty are filled with freshly drawn chunks of classes not yet in the row
   (:func:`fill_empty_slots`);
4. the chunks become dataset indices (:meth:`ClassTable.gather`).

The :class:`ChunkBatchSampler` base class owns the parts that do not depend on how chunks are grouped: the
epoch, the seed, the local random generator and the split of the global batch list between DDP ranks.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from torch.utils.data import Sampler

from objretrieval._validation import check_choice, check_labels, check_positive_int
from objretrieval.display import ConfigRepr
from objretrieval.distributed import world as distributed

SmallClasses = Literal["error", "replace", "drop"]

IntArray = npt.NDArray[np.int64]

_FILL_REJECTION_ROUNDS = 8


def as_label_array(
    values: Any, name: str, length: int | None = None, length_of: str | None = None
) -> IntArray:
    """Return integer labels as a 1-D int64 numpy array; non-integer, non-1-D and empty inputs are refused.

    Raises:
        TypeError: ``values`` is not array-like or not of an integer dtype (float labels merge above 2**24).
        ValueError: ``values`` is not 1-D, is empty or has the wrong length.
    """
    labels = check_labels(values, name, length, length_of)
    if labels.numel() == 0:
        raise ValueError(f"{name} is empty: expected one integer label per sample")
    return labels.cpu().numpy()


def check_seed(value: Any, name: str) -> int:
    """Return ``value`` as a non-negative Python int (as ``numpy.random.default_rng`` takes entropy)."""
    return check_positive_int(value, name, minimum=0)


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else torch.distributed's if initialised, else (0, 1)."""
    if world_size is None:
        world_size = distributed.world_size()
    if rank is None:
        rank = distributed.rank()
    world_size = check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must satisfy 0 <= rank < world_size={world_size}, got rank={rank}")
    return int(rank), world_size


def check_sizes(batch_size: Any, m: Any, group_size_name: str, divisor: int) -> tuple[int, int]:
    """Validate ``batch_size`` and ``m``; ``batch_size`` must be a multiple of ``divisor * m``."""
    batch_size = check_positive_int(batch_size, "batch_size")
    m = check_positive_int(m, "m")
    if batch_size % (divisor * m):
        factor = "m" if divisor == 1 else f"{divisor}*m"
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by {factor} ({divisor * m}) so that every "
            f"{group_size_name} holds whole groups of m={m} indices"
        )
    return batch_size, m


@dataclass(frozen=True)
class ClassTable:
    """The classes a sampler draws from, after the small-class policy.

    Attributes:
        values: (C,) int64 original label value of each kept class, ascending. Classes are referred to by
            their position in this array ("dense class id").
        sizes: (C,) int64 number of samples of each class.
        offsets: (C,) int64 start of each class's members in :attr:`members`.
        members: (N_kept,) int64 dataset indices grouped by class (ascending within a class).
        member_class: (N_kept,) int64 dense class id of each entry of :attr:`members`.
        m: indices per chunk.
        dropped: how many classes the ``"drop"`` policy removed.
    """

    values: IntArray
    sizes: IntArray
    offsets: IntArray
    members: IntArray
    member_class: IntArray
    m: int
    dropped: int

    @classmethod
    def from_labels(cls, labels: IntArray, m: int, small_classes: str) -> ClassTable:
        """Group ``labels`` (N,) by class; apply ``small_classes`` to classes with fewer than ``m`` samples.

        Raises:
            ValueError: ``small_classes="error"`` and some class has fewer than ``m`` samples.
        """
        small_classes = check_choice(small_classes, "small_classes", SmallClasses)
        values, dense, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        small = sizes < m
        n_small = int(small.sum())
        if n_small and small_classes == "error":
            raise ValueError(
                f"{n_small} of {values.size} classes have fewer than m={m} samples (the smallest has "
                f"{int(sizes.min())}); pass small_classes='replace' to sample them with replacement or "
                "small_classes='drop' to exclude them"
            )
        order = np.argsort(dense, kind="stable")
        members, member_class = order.astype(np.int64), dense[order].astype(np.int64)
        dropped = 0
        if n_small and small_classes == "drop":
            keep_member = ~small[member_class]
            remap = np.cumsum(~small) - 1
            members, member_class = members[keep_member], remap[member_class[keep_member]]
            values, sizes, dropped = values[~small], sizes[~small], n_small
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        return cls(
            values=values.astype(np.int64),
            sizes=sizes.astype(np.int64),
            offsets=offsets,
            members=members,
            member_class=member_class.astype(np.int64),
            m=m,
            dropped=dropped,
        )

    @property
    def num_classes(self) -> int:
        return int(self.values.size)

    @property
    def chunks_per_class(self) -> IntArray:
        """(C,) number of chunks of ``m`` that cover each class: ``ceil(size / m)``."""
        return -(-self.sizes // self.m)

    def describe_drop(self) -> str:
        """`` after dropping N classes smaller than m`` when the drop policy removed some, else ``""``."""
        return (
            f" after dropping {self.dropped} classes with fewer than m={self.m} samples"
            if self.dropped
            else ""
        )

    def shuffled_members(self, rng: np.random.Generator) -> IntArray:
        """(N_kept,) :attr:`members` with the members of each class in a random order (classes stay put)."""
        return self.members[np.lexsort((rng.random(self.members.size), self.member_class))]

    def gather(
        self, classes: IntArray, chunk_starts: IntArray, shuffled: IntArray, rng: np.random.Generator
    ) -> IntArray:
        """Dataset indices of chunks.

        Chunk ``k`` takes ``m`` consecutive positions of its class's shuffled order from ``chunk_starts[k]``,
        wrapping to the start of the order (distinct indices, as ``start < size`` and ``m <= size``). Classes
        smaller than ``m`` (``small_classes="replace"``) give all their members, then random members.

        Args:
            classes: (K,) dense class ids.
            chunk_starts: (K,) start position in the class's order, in ``[0, size)``.
            shuffled: (N_kept,) output of :meth:`shuffled_members` for this epoch.
            rng: generator for the replacement draws.

        Returns:
            (K, m) int64 dataset indices.
        """
        sizes = self.sizes[classes][:, None]
        positions = chunk_starts[:, None] + np.arange(self.m)
        wrapped = positions >= sizes
        if wrapped.any():
            drawn = (rng.random(positions.shape) * sizes).astype(np.int64)
            positions = np.where(wrapped, np.where(sizes >= self.m, positions - sizes, drawn), positions)
        return shuffled[self.offsets[classes][:, None] + positions]

    def random_starts(self, classes: IntArray, rng: np.random.Generator) -> IntArray:
        """(K,) random chunk starts for freshly drawn chunks (0 for classes smaller than ``m``)."""
        sizes = self.sizes[classes]
        starts = (rng.random(classes.size) * sizes).astype(np.int64)
        return np.where(sizes >= self.m, starts, 0)

    def build_groups(
        self, classes: IntArray, rows: int, width: int, shuffled: IntArray, rng: np.random.Generator
    ) -> IntArray:
        """Rows of ``width`` chunks of distinct classes drawn from ``classes``, covering all their members.

        Every member of ``classes`` lands in at least one row; cells left over are filled with fresh chunks of
        classes not yet in the row. The chunk order within each row is random; the row order is not.

        Args:
            classes: (C_sub,) dense class ids to draw from; ``C_sub >= width``.
            rows: number of rows; at least ``ceil(total chunks / width)`` and at least the chunk count of
                every class in ``classes``.
            width: chunks per row.
            shuffled: (N_kept,) output of :meth:`shuffled_members` for this epoch.
            rng: the epoch's generator.

        Returns:
            (rows, width * m) int64 dataset indices; the ``m`` indices of a chunk are contiguous.
        """
        local, chunk_index = layout_chunks(self.chunks_per_class[classes], rows, width, rng)
        fresh = local < 0
        fill_empty_slots(local, classes.size, rng)
        order = np.argsort(rng.random(local.shape), axis=1)  # random chunk order within each row
        local = np.take_along_axis(local, order, axis=1).ravel()
        chunk_index = np.take_along_axis(chunk_index, order, axis=1).ravel()
        fresh = np.take_along_axis(fresh, order, axis=1).ravel()
        dense = classes[local]
        starts = chunk_index * self.m
        starts[fresh] = self.random_starts(dense[fresh], rng)
        return self.gather(dense, starts, shuffled, rng).reshape(rows, width * self.m)


def layout_chunks(
    chunk_counts: IntArray, rows: int, width: int, rng: np.random.Generator
) -> tuple[IntArray, IntArray]:
    """Lay the chunks of all classes out column by column in a (rows, width) grid.

    The classes are taken in a random order, the chunks of one class consecutively, so a class with at most
    ``rows`` chunks never appears twice in a row (consecutive cells in column-major order lie in distinct
    rows).

    Args:
        chunk_counts: (C,) chunks of each (local) class; every count is ``<= rows``, the total is
            ``<= rows * width``.
        rows: grid rows.
        width: grid columns.
        rng: generator for the class order.

    Returns:
        ``(classes, chunk_index)``, both (rows, width) int64: the local class of each cell (-1 for an empty
        cell) and which chunk of its class the cell holds (0 for empty cells).
    """
    order = rng.permutation(chunk_counts.size)
    counts = chunk_counts[order]
    total = int(counts.sum())
    sequence = np.repeat(order, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    classes = np.full(rows * width, -1, dtype=np.int64)
    chunk_index = np.zeros(rows * width, dtype=np.int64)
    classes[:total] = sequence
    chunk_index[:total] = np.arange(total) - first
    return classes.reshape(width, rows).T.copy(), chunk_index.reshape(width, rows).T.copy()


def fill_empty_slots(slots: IntArray, pool: int, rng: np.random.Generator) -> None:
    """Replace, in place, each -1 in ``slots`` by a class in ``[0, pool)`` that is not yet in its row.

    A few vectorised rejection rounds draw classes uniformly and keep those not already in the row; rows still
    incomplete after that (only likely when ``pool`` is close to the row width) draw a random subset of the
    classes missing from the row directly.

    Args:
        slots: (R, W) int64 grid of class ids, distinct within each row, -1 for empty cells; ``pool >= W``.
        pool: number of classes to draw from.
        rng: generator.
    """
    empty_rows, empty_cols = np.nonzero(slots < 0)
    for _ in range(_FILL_REJECTION_ROUNDS):
        if empty_rows.size == 0:
            return
        slots[empty_rows, empty_cols] = rng.integers(0, pool, size=empty_rows.size)
        clash = _clashing_draws(slots, empty_rows, empty_cols, pool)
        empty_rows, empty_cols = empty_rows[clash], empty_cols[clash]
        slots[empty_rows, empty_cols] = -1
    if empty_rows.size == 0:
        return
    rows, row_of_cell = np.unique(empty_rows, return_inverse=True)
    sub = slots[rows]
    keys = rng.random((rows.size, pool))
    held_rows, held_cols = np.nonzero(sub >= 0)
    keys[held_rows, sub[held_rows, held_cols]] = 2.0  # classes already in the row sort last
    candidates = np.argsort(keys, axis=1)
    # the k-th empty cell of a row takes the row's k-th candidate (cells come row by row from np.nonzero)
    rank_in_row = np.arange(empty_rows.size) - np.searchsorted(empty_rows, empty_rows)
    slots[empty_rows, empty_cols] = candidates[row_of_cell.ravel(), rank_in_row]


def _clashing_draws(slots: IntArray, rows: IntArray, cols: IntArray, pool: int) -> npt.NDArray[np.bool_]:
    """Which drawn cells ``(rows, cols)`` repeat a class already in their row (held or drawn first)."""
    touched = np.unique(rows)
    sub = slots[touched]
    drawn = np.zeros(sub.shape, dtype=bool)
    drawn[np.searchsorted(touched, rows), cols] = True
    keys = (np.arange(touched.size)[:, None] * pool + sub).ravel()
    order = np.lexsort((drawn.ravel(), keys))  # within equal keys, held cells first
    sorted_keys = keys[order]
    repeated = np.zeros(keys.size, dtype=bool)
    repeated[order[1:]] = sorted_keys[1:] == sorted_keys[:-1]
    return repeated.reshape(sub.shape)[np.searchsorted(touched, rows), cols]


class ChunkBatchSampler(ConfigRepr, Sampler[list[int]]):
    """Base class: epoch handling, the per-epoch generator and the split of the global batches over ranks.

    Subclasses implement :meth:`_num_global_batches` (fixed for the sampler) and :meth:`_global_batches` (the
    whole epoch's batches, identical on every rank). They print their constructor arguments
    (:class:`~objretrieval.display.ConfigRepr`); the label arrays are data and are left out.
    """

    def __init__(self, seed: int, rank: int | None, world_size: int | None) -> None:
        super().__init__()
        self.seed = check_seed(seed, "seed")
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (call it before every epoch, as with
        :class:`torch.utils.data.distributed.DistributedSampler`)."""
        self.epoch = check_seed(epoch, "epoch")

    def __len__(self) -> int:
        """Batches this rank yields per epoch: ``ceil(global batches / world_size)``."""
        return -(-self._num_global_batches() // self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches(np.random.default_rng([self.seed, self.epoch]))
        total = batches.shape[0]
        assert total == self._num_global_batches(), (total, self._num_global_batches())
        # every rank yields len(self) batches: the list is padded by wrapping around to its start
        picked = np.arange(self.rank, len(self) * self.world_size, self.world_size) % total
        return iter(batches[picked].tolist())

    @abstractmethod
    def _num_global_batches(self) -> int:
        """Batches per epoch over all ranks (before padding)."""

    @abstractmethod
    def _global_batches(self, rng: np.random.Generator) -> IntArray:
        """(num_global_batches, batch_size) int64 dataset indices of one epoch, drawn from ``rng`` only."""
