"""A running top-k over streamed score blocks with deterministic tie-breaking.

Ranking order is (score descending, gallery index ascending) everywhere in objretrieval, so results do not
depend on the block size, the block order, the device or the backend's internal tie order.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Most columns per chunk in :func:`block_topk`'s two-level selection.
MAX_CHUNK = 32
#: Fewest columns per chunk worth a two-level selection.
MIN_CHUNK = 4
#: From this k on, full rows take only the entries above their current k-th best instead of a selection.
SPARSE_MIN_K = 24


def sort_by_score_then_index(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score descending, ties by index ascending, and index -1 (a missing entry) last.

    One sort of an int64 key (:func:`score_index_keys`). Indices must lie in [-1, 2**32 - 2].
    """
    order = score_index_keys(scores, indices).argsort(dim=1, descending=True)
    return scores.gather(1, order), indices.gather(1, order)


def score_index_keys(scores: Tensor, indices: Tensor) -> Tensor:
    """int64 keys ordering (float32 score descending, index ascending, index -1 last): the order-preserving
    int32 of the score in the high half (-0.0 folded into +0.0), ``2**32 - 1 - index`` in the low half."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) + ((-1 - indices) & 0xFFFFFFFF)


def keys_to_scores_and_indices(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`score_index_keys`: (float32 scores, int64 indices) of int64 keys."""
    ordered = (keys >> 32).to(torch.int32)
    scores = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    return scores, 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def _chunk_max(block: Tensor, n_chunks: int, chunk: int) -> Tensor:
    """(rows, n_chunks) maxima over consecutive column chunks, reducing along the block's memory layout."""
    width = n_chunks * chunk
    if block.stride(0) == 1 and block.stride(1) != 1:  # a transposed view: reduce over its rows instead
        return block.T[:width].unflatten(0, (n_chunks, chunk)).amax(dim=1).T
    return block[:, :width].unflatten(1, (n_chunks, chunk)).amax(dim=2)


def _chunk_size(n_cols: int, k: int) -> int:
    """Chunk width for the two-level selection: the k best chunks cover at most a quarter of the row."""
    return min(MAX_CHUNK, n_cols // (4 * k))


def _candidate_columns(block: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Columns that can hold a row's top-k, and rows where a tie between chunk maxima makes that unsafe.

    A row's k-th largest value v is at least the k-th largest chunk maximum, so every element above v lies in
    one of the k chunks with the largest maxima: it suffices to search those chunks (plus the ragged tail).
    """
    n_rows, n_cols = block.shape
    n_chunks = n_cols // chunk
    top, chunks = _chunk_max(block, n_chunks, chunk).topk(k + 1, dim=1)
    tied = top[:, k - 1] == top[:, k]
    offsets = torch.arange(chunk, device=block.device)
    cols = (chunks[:, :k, None] * chunk + offsets).flatten(1)
    if n_chunks * chunk < n_cols:
        tail = torch.arange(n_chunks * chunk, n_cols, device=block.device)
        cols = torch.cat([cols, tail.expand(n_rows, -1)], dim=1)
    return cols, tied


def block_topk(block: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best (values, columns) of every row of ``block``; ties at the cut go to the lower column.

    Returns the right set in descending value order, but equal values inside it in no particular order:
    :func:`sort_by_score_then_index` (which :class:`RunningTopK` applies when merging) settles that.

    For small ``k`` the search runs in two levels (chunk maxima, then the best chunks), which reads the block
    once at memory speed and is several times faster than ``torch.topk`` on transposed views. ``torch.topk``
    picks arbitrarily among values tied at the k-th place; asking for one more value reveals those rows,
    which are redone with a stable sort (rare for real-valued data).
    """
    n_cols = block.shape[1]
    if k >= n_cols:
        return block.sort(dim=1, descending=True, stable=True)
    chunk = _chunk_size(n_cols, k)
    if chunk >= MIN_CHUNK:
        cols, tied = _candidate_columns(block, k, chunk)
        values, pos = block.gather(1, cols).topk(k + 1, dim=1)
        cols = cols.gather(1, pos)
    else:
        values, cols = block.topk(k + 1, dim=1)
        tied = torch.zeros_like(values[:, 0], dtype=torch.bool)
    tied |= values[:, k - 1] == values[:, k]
    values, cols = values[:, :k], cols[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        exact_values, exact_cols = block[rows].sort(dim=1, descending=True, stable=True)
        values[rows], cols[rows] = exact_values[:, :k], exact_cols[:, :k]
    return values, cols


class RunningTopK:
    """Best ``k`` (score, index) pairs per row, updated block by block; O(rows x k) memory.

    Args:
        num_rows: number of query rows.
        k: neighbours kept per row.
        device: where the state lives.
    """

    def __init__(self, num_rows: int, k: int, device: torch.device) -> None:
        self.k = k
        self.scores = torch.full((num_rows, k), float("-inf"), dtype=torch.float32, device=device)
        self.indices = torch.full((num_rows, k), -1, dtype=torch.int64, device=device)

    def update(self, row_start: int, block: Tensor, col_offset: int) -> None:
        """Merge a (rows, cols) score block whose rows start at ``row_start`` and columns at ``col_offset``.

        ``block`` may be a transposed view (the symmetric leave-one-out search passes ``scores.T``).
        """
        rows = slice(row_start, row_start + block.shape[0])
        found = self._above_threshold(rows, block) if self.k >= SPARSE_MIN_K else None
        values, cols = found if found is not None else block_topk(block, min(self.k, block.shape[1]))
        merged_scores, merged_indices = sort_by_score_then_index(
            torch.cat([self.scores[rows], values], dim=1),
            torch.cat([self.indices[rows], cols + col_offset], dim=1),
        )
        self.scores[rows] = merged_scores[:, : self.k]
        self.indices[rows] = merged_indices[:, : self.k]

    def _above_threshold(self, rows: slice, block: Tensor) -> tuple[Tensor, Tensor] | None:
        """Entries that can still enter each full row's top-k (score >= its current k-th), left-aligned.

        Once the rows are full, few entries of a new block beat their k-th best, so extracting those is much
        cheaper than a top-k selection when k is large. Returns None (use :func:`block_topk`) while some row
        is not yet full, for transposed views, or when a row has more than k candidates.
        """
        threshold = self.scores[rows, -1]
        if block.stride(1) != 1 or not bool(torch.isfinite(threshold).all()):
            return None
        r, c = (block >= threshold[:, None]).nonzero(as_tuple=True)
        counts = torch.bincount(r, minlength=block.shape[0])
        width = int(counts.max()) if r.numel() else 0
        if width > self.k:
            return None
        slot = torch.arange(r.numel(), device=block.device) - (counts.cumsum(0) - counts)[r]
        values = torch.full((block.shape[0], width), float("-inf"), device=block.device)
        cols = torch.full((block.shape[0], width), -1, dtype=torch.int64, device=block.device)
        values[r, slot] = block[r, c]
        cols[r, slot] = c
        return values, cols
