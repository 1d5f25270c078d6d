"""The exhaustive rank count of :func:`~objretrieval.metrics.ranks_exhaustive`, sharded over processes.

``map`` and ``mrr`` need the rank of every relevant item in the whole gallery, which a top-k list does not
give. :func:`sharded_relevant_ranks` counts them exactly with the gallery sharded over the ranks, on the
blocks of :class:`~objretrieval.distributed.knn.ShardedSearch`, so every score, and so every rank, is the
one a single process computes. :class:`GlobalShard` is one rank's part of a globally ordered set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from objretrieval._validation import check_choice
from objretrieval.distributed.knn import ShardedSearch
from objretrieval.distributed.world import Group, all_gather_uneven, all_reduce_sum_
from objretrieval.metrics.ranks import LabelComparison, Relevance, RelevantRanks, left_align, relevant_pairs
from objretrieval.search.exact import (
    PRECISIONS,
    ExactRanks,
    Precision,
    Screen,
    ScreenRows,
    SearchStats,
    check_stats,
)
from objretrieval.search.scoring import Metric


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
    precision: Precision = "float32",
    stats: SearchStats | None = None,
) -> RelevantRanks:
    """The rank of every relevant item of this rank's queries over the gallery sharded across ranks.

    The count of :func:`~objretrieval.metrics.ranks_exhaustive` (exact scores, ties to the lower position), on
    the rounds of :meth:`~objretrieval.distributed.knn.ShardedSearch.query_rounds` that
    :func:`~objretrieval.distributed.knn.sharded_knn` searches on (one process's blocks, prepared as one
    process prepares them). In each round every rank scores exactly the relevant items among its gallery
    blocks, these are gathered, every rank counts its items ranked above each of them
    (:class:`~objretrieval.search.exact.ExactRanks`), the counts are summed, and the ranks travel back to the
    queries' ranks: the ranks of one process. Memory per rank: O(query block x ``width``) besides the shards;
    ``width`` is the largest number of relevant items of a query.

    Args:
        num_relevant: (n_q,) relevant items of this rank's queries.
        precision: the screening products, ``"float32"`` or ``"bf16-exact"`` (same ranks).
        stats: optional :class:`~objretrieval.search.exact.SearchStats` filled in with this rank's counts, as
            :func:`~objretrieval.distributed.knn.sharded_knn` fills it: this rank's queries and the pairs of
            its gallery blocks. Summed over the ranks, ``queries`` and ``screened`` are one process's counts
            (:func:`~objretrieval.metrics.ranks_exhaustive`), and so is ``rescored`` in float32.
    """
    device = device if device is not None else queries.embeddings.device
    screen = Screen(metric, check_choice(precision, "precision", PRECISIONS))
    check_stats(stats)
    if stats is not None:
        stats.precision, stats.queries = precision, stats.queries + queries.ids.shape[0]
    search = ShardedSearch(1, metric, device, group, screen)
    num_q = queries.labels.shape[0]
    q_moves, rounds = search.query_rounds(
        queries.embeddings, queries.ids, gallery.embeddings, gallery.ids, num_q, block_size, query_block_size
    )
    q_labels, g_labels = queries.labels.to(device), gallery.labels.to(device)
    screened: dict[int, ScreenRows] = {}  # this rank's gallery blocks, ready for screening once
    results = []
    for r in rounds:
        count = len(r.queries)
        exclude = torch.arange(r.start, r.start + count, device=device) if leave_one_out else None
        relevance = Relevance(q_labels[r.start : r.start + count], g_labels, exclude, label_comparison_fn)
        qs = screen.rows(r.queries, "queries")
        for col, gal in r.gallery:
            if col not in screened:
                screened[col] = screen.rows(gal, "gallery", col)
        blocks = [(col, screened[col]) for col, _ in r.gallery]
        block_ranks = _block_ranks(qs, blocks, relevance, screen, r.buffer, width, group, stats)
        if search.rank == r.owner:
            results.append(block_ranks)
    held = torch.cat(results) if results else torch.empty((0, width), dtype=torch.int64, device=device)
    ranks = q_moves.backward(held.to(search.comm)).to(device)
    return RelevantRanks(left_align(ranks), num_relevant.to(device), None)


def _block_ranks(
    qs: ScreenRows,
    blocks: list[tuple[int, ScreenRows]],
    relevance: Relevance,
    screen: Screen,
    buffer: Tensor,
    width: int,
    group: Group,
    stats: SearchStats | None = None,
) -> Tensor:
    """(rows, width) 1-based ranks of the relevant items of one query block (0 padding, not left-aligned)
    over this rank's gallery ``blocks`` ``(global column, rows)``: the two passes of
    :func:`~objretrieval.metrics.ranks_exhaustive`, each followed by an exchange. ``relevance.exclude`` holds
    global columns."""
    rows, device = len(qs), qs.points.device
    # Pass 1: the exact score and global position of every relevant item held here, gathered from every rank
    # (float64 holds the row, the position and the float32 score exactly).
    found = [torch.empty((0, 3), dtype=torch.float64, device=device)]
    for col, g in blocks:
        r, c, exact = relevant_pairs(relevance, qs.points, 0, g.points, col, screen.metric)
        found.append(torch.stack([r.double(), (c + col).double(), exact.double()], dim=1))
    packed, _ = all_gather_uneven(torch.cat(found), group, "relevant items")
    r, order = torch.sort(packed[:, 0].long(), stable=True)
    per_row = torch.bincount(r, minlength=rows)
    slot = torch.arange(r.numel(), device=device) - (torch.cumsum(per_row, 0) - per_row)[r]
    rel_scores = torch.full((rows, width), float("inf"), device=device)
    rel_index = torch.full((rows, width), -1, dtype=torch.int64, device=device)
    rel_scores[r, slot] = packed[order, 2].float()
    rel_index[r, slot] = packed[order, 1].long()

    # Pass 2: this rank's items ranked above each relevant item, summed over the ranks.
    counter = ExactRanks(rel_scores, rel_index, stats)
    for col, g in blocks:
        counter.update(0, col, qs, g, screen, relevance.exclude, buffer)
    all_reduce_sum_(counter.counts, group)
    return counter.ranks()
