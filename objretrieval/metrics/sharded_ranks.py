"""The exhaustive rank count of :func:`~objretrieval.metrics.ranks_exhaustive`, sharded over processes.

``map`` and ``mrr`` need the rank of every relevant item in the whole gallery, which a top-k list does not
give. :func:`sharded_relevant_ranks` counts them exactly with the gallery sharded over the ranks, on the
blocks of :class:`~objretrieval.distributed.knn.ShardedSearch`, so every score, and so every rank, is the
one a single process computes. :class:`GlobalShard` is one rank's part of a globally ordered set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from objretrieval.distributed.knn import ShardedSearch
from objretrieval.distributed.world import Group, all_gather_uneven, all_reduce_sum_
from objretrieval.metrics.ranks import COMPARE_BUDGET, LabelComparison, Relevance, RelevantRanks, left_align
from objretrieval.search.scoring import Metric, Prepared, mask_excluded, score_block


@dataclass
class GlobalShard:
    """This rank's part of one role after deduplication.

    Attributes:
        embeddings: (n_r, D) this rank's kept rows, in global order.
        ids: (n_r,) their positions in the global order (the order of evaluation), CPU.
        labels: (N, ...) every rank's kept labels, in global order, CPU.
        gathered_ids: (N,) every rank's ``ids`` in rank order, CPU.
        device: where tensors are exchanged (the module's device: CUDA under nccl).
    """

    embeddings: Tensor
    ids: Tensor
    labels: Tensor
    gathered_ids: Tensor
    device: torch.device

    def to_global(self, x: Tensor, group: Group) -> Tensor:
        """Every rank's ``x`` (one row per id of its shard) in global order, on ``x``'s device."""
        gathered, _ = all_gather_uneven(x.to(self.device).contiguous(), group, "per-item values")
        out = torch.empty_like(gathered)
        out[self.gathered_ids.to(out.device)] = gathered
        return out.to(x.device)


def sharded_relevant_ranks(
    queries: GlobalShard,
    gallery: GlobalShard,
    num_relevant: Tensor,
    width: int,
    *,
    leave_one_out: bool,
    metric: Metric,
    label_comparison_fn: LabelComparison | None,
    device: torch.device | None,
    block_size: int,
    group: Group,
    query_block_size: int = 1024,
) -> RelevantRanks:
    """The exact rank of every relevant item of this rank's queries over the gallery sharded across ranks.

    The streamed count of :func:`~objretrieval.metrics.ranks_exhaustive`, on the rounds of
    :meth:`~objretrieval.distributed.knn.ShardedSearch.query_rounds` that
    :func:`~objretrieval.distributed.knn.sharded_knn` searches on (one process's blocks, prepared as one
    process prepares them), so every score is bit-identical to one process's. In each round every rank finds
    the relevant items among its gallery blocks (scores and global positions), these are gathered, every rank
    counts its items ranked above each of them under the (score descending, position ascending) order, the
    counts are summed, and the
    ranks travel back to the queries' ranks. Memory per rank: O(query block x ``width``) besides the shards;
    ``width`` is the largest number of relevant items of a query.

    Args:
        num_relevant: (n_q,) relevant items of this rank's queries.
    """
    device = device if device is not None else queries.embeddings.device
    search = ShardedSearch(1, metric, device, group)
    num_q = queries.labels.shape[0]
    q_moves, rounds = search.query_rounds(
        queries.embeddings, queries.ids, gallery.embeddings, gallery.ids, num_q, block_size, query_block_size
    )
    q_labels, g_labels = queries.labels.to(device), gallery.labels.to(device)
    results = []
    for r in rounds:
        count = len(r.queries)
        relevance = Relevance(q_labels[r.start : r.start + count], g_labels, None, label_comparison_fn)
        exclude = torch.arange(r.start, r.start + count, device=device) if leave_one_out else None
        scores = functools.partial(_block_scores, r.queries, r.gallery, exclude, metric, r.buffer)
        block_ranks = _block_ranks(scores, relevance, count, width, device, group)
        if search.rank == r.owner:
            results.append(block_ranks)
    held = torch.cat(results) if results else torch.empty((0, width), dtype=torch.int64, device=device)
    ranks = q_moves.backward(held.to(search.comm)).to(device)
    return RelevantRanks(left_align(ranks), num_relevant.to(device), None)


def _block_scores(
    block: Prepared,
    gallery_blocks: list[tuple[int, Prepared]],
    exclude: Tensor | None,
    metric: Metric,
    buffer: Tensor,
) -> Iterator[tuple[int, Tensor]]:
    """``(global column, scores)`` of a query block against this rank's gallery blocks, self pairs at -inf."""
    for col, prepared in gallery_blocks:
        s = score_block(block, prepared, metric, out=buffer)
        mask_excluded(s, exclude, 0, col)
        yield col, s


def _block_ranks(
    scores: Callable[[], Iterator[tuple[int, Tensor]]],
    relevance: Relevance,
    rows: int,
    width: int,
    device: torch.device,
    group: Group,
) -> Tensor:
    """(rows, width) 1-based ranks of the relevant items of one query block (0 padding, not left-aligned).

    ``scores()`` yields ``(global column, block)`` over this rank's gallery blocks, self pairs at -inf; the
    two passes are those of :func:`~objretrieval.metrics.ranks_exhaustive`, each followed by an exchange.
    """
    # Pass 1: the score and global position of every relevant item held here, gathered from every rank
    # (float64 holds the row, the position and the float32 score exactly).
    found = [torch.empty((0, 3), dtype=torch.float64, device=device)]
    for col, s in scores():
        r, c = (relevance.block(0, rows, col, s.shape[1]) & (s > float("-inf"))).nonzero(as_tuple=True)
        found.append(torch.stack([r.double(), (c + col).double(), s[r, c].double()], dim=1))
    packed, _ = all_gather_uneven(torch.cat(found), group, "relevant items")
    r = packed[:, 0].long()
    order = torch.sort(r, stable=True).indices
    r = r[order]
    per_row = torch.bincount(r, minlength=rows)
    slot = torch.arange(r.numel(), device=device) - (torch.cumsum(per_row, 0) - per_row)[r]
    rel_scores = torch.full((rows, width), float("inf"), device=device)
    rel_index = torch.full((rows, width), -1, dtype=torch.int64, device=device)
    rel_scores[r, slot] = packed[order, 2].float()
    rel_index[r, slot] = packed[order, 1].long()

    # Pass 2: this rank's items ranked above each relevant item, summed over the ranks.
    above = torch.zeros((rows, width), dtype=torch.int64, device=device)
    for col, s in scores():
        cols = torch.arange(col, col + s.shape[1], device=device)[None, :, None]
        chunk = max(1, COMPARE_BUDGET // (s.shape[1] * width))
        for a in range(0, rows, chunk):
            b = s[a : a + chunk, :, None]
            score, index = rel_scores[a : a + chunk, None, :], rel_index[a : a + chunk, None, :]
            ranked_above = (b > score) | ((b == score) & (cols < index))
            above[a : a + chunk] += (ranked_above & (cols != index)).sum(dim=1)
    all_reduce_sum_(above, group)
    return torch.where(rel_index >= 0, above + 1, 0)
