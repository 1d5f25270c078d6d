"""Ranks of the relevant items: the one representation every ranking metric is computed from.

Recall@K, precision@1, R-precision, MAP@R, mAP, MRR and the revisited Oxford/Paris AP are all functions of
*where each query's relevant items landed* in its ranking. :class:`RelevantRanks` stores exactly that,
O(Q x P) for P relevant items per query, whether it comes from a kNN shortlist, a precomputed ranking or an
exhaustive streamed count over the whole gallery. :class:`Relevance` says which gallery items are relevant to
which query (same label, or a custom label comparison), always evaluated block by block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from objretrieval._validation import check_choice
from objretrieval.search.exact import (
    PRECISIONS,
    ExactRanks,
    Precision,
    Screen,
    SearchStats,
    check_stats,
    exact_pair_scores,
)
from objretrieval.search.scoring import Metric, Prepared, prepare, prepared_blocks
from objretrieval.search.sources import BlockSource, GalleryLike

#: ``label_comparison_fn(query_labels, gallery_labels) -> bool``, pytorch-metric-learning's convention: the two
#: arguments broadcast against each other (e.g. (q, 1, *) and (1, g, *)) and the result has their broadcast
#: leading shape, (q, g). Example for (N, L) hierarchical labels, relevant = same coarse class:
#: ``lambda a, b: a[..., 0] == b[..., 0]``.
LabelComparison = Callable[[Tensor, Tensor], Tensor]

# Label pairs handed to a custom comparison at once when counting relevant items.
_LABEL_BUDGET = 1 << 22


@dataclass(frozen=True)
class Relevance:
    """Which gallery items are relevant to each query.

    Relevant means "same label" (1-D labels), or whatever ``label_comparison_fn`` says (labels may then be
    (N, L), e.g. hierarchical levels). The comparison only ever sees blocks of query and gallery labels, never
    the whole Q x N matrix.

    Attributes:
        query_labels: (Q,) or (Q, L) int64.
        gallery_labels: (N,) or (N, L) int64.
        exclude: optional (Q,) gallery index each query must not count (itself, under leave-one-out), -1 for
            none.
        label_comparison_fn: a :data:`LabelComparison`, or None for equality of 1-D labels.
    """

    query_labels: Tensor
    gallery_labels: Tensor
    exclude: Tensor | None = None
    label_comparison_fn: LabelComparison | None = None

    def to(self, device: torch.device) -> Relevance:
        ex = None if self.exclude is None else self.exclude.to(device)
        return Relevance(
            self.query_labels.to(device), self.gallery_labels.to(device), ex, self.label_comparison_fn
        )

    def compare(self, query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
        """Relevance of broadcastable label tensors, e.g. (q, 1, *) against (1, g, *) -> (q, g) bool."""
        if self.label_comparison_fn is None:
            return query_labels == gallery_labels
        expected = torch.broadcast_shapes(query_labels.shape[:2], gallery_labels.shape[:2])
        out = self.label_comparison_fn(query_labels, gallery_labels)
        if not isinstance(out, Tensor) or out.dtype != torch.bool or tuple(out.shape) != tuple(expected):
            got = (
                f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            )
            raise TypeError(
                f"label_comparison_fn must return a bool tensor of shape {tuple(expected)} for labels of "
                f"shapes {tuple(query_labels.shape)} and {tuple(gallery_labels.shape)}, got {got}"
            )
        return out

    def block(self, row_start: int, num_rows: int, col_start: int, num_cols: int) -> Tensor:
        """(num_rows, num_cols) bool relevance of a contiguous block of queries and gallery items."""
        q = self.query_labels[row_start : row_start + num_rows, None]
        g = self.gallery_labels[None, col_start : col_start + num_cols]
        return self.compare(q, g)

    def of_ranking(self, ranking: Tensor) -> Tensor:
        """(Q, K) bool: whether each ranked gallery id is relevant (-1 slots are not)."""
        retrieved = self.gallery_labels[ranking.clamp(min=0)]
        return (ranking >= 0) & self.compare(self.query_labels[:, None], retrieved)

    def count(self) -> Tensor:
        """(Q,) int64 number of relevant gallery items of each query, the excluded item not counted."""
        if self.label_comparison_fn is None:
            n = _count_equal(self.query_labels, self.gallery_labels)
        else:
            n = self._count_blocks()
        if self.exclude is not None:
            has = self.exclude >= 0
            excluded = self.gallery_labels[self.exclude.clamp(min=0), None]
            excluded_is_relevant = has & self.compare(self.query_labels[:, None], excluded)[:, 0]
            n = n - excluded_is_relevant.long()
        return n

    def classes(self) -> Tensor:
        """(Q,) int64 index of each query's label (row) among the distinct query labels."""
        return torch.unique(self.query_labels, dim=0, return_inverse=True)[1]

    def _count_blocks(self) -> Tensor:
        num_queries, num_gallery = self.query_labels.shape[0], self.gallery_labels.shape[0]
        cols = min(num_gallery, _LABEL_BUDGET)
        rows = max(1, _LABEL_BUDGET // cols)
        n = torch.zeros(num_queries, dtype=torch.int64, device=self.query_labels.device)
        for r in range(0, num_queries, rows):
            for c in range(0, num_gallery, cols):
                n[r : r + rows] += self.block(r, rows, c, cols).sum(dim=1)
        return n


def _count_equal(query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """(Q,) gallery items sharing each query's label: one sort of the gallery labels, no Q x N matrix."""
    classes, counts = torch.unique(gallery_labels, return_counts=True)
    slot = torch.searchsorted(classes, query_labels.contiguous()).clamp(max=classes.numel() - 1)
    return torch.where(classes[slot] == query_labels, counts[slot], torch.zeros_like(counts[slot]))


@dataclass(frozen=True)
class RelevantRanks:
    """Where the relevant gallery items of each query appear in its ranking.

    Attributes:
        ranks: (Q, P) int64 1-based ranks of the relevant items found in the ranking, ascending along each
            row, padded with 0 on the right.
        num_relevant: (Q,) int64 number of relevant items each query has in the gallery, found or not.
        depth: how far down the ranking was examined; ``None`` when the whole gallery was ranked, in which
            case every relevant item is found.
    """

    ranks: Tensor
    num_relevant: Tensor
    depth: int | None

    @property
    def found(self) -> Tensor:
        """(Q, P) bool, True where ``ranks`` holds a real rank rather than padding."""
        return self.ranks > 0

    @property
    def num_queries(self) -> int:
        return self.ranks.shape[0]

    def truncate(self, depth: int) -> RelevantRanks:
        """The same ranks as a ranking cut at ``depth`` would give."""
        if self.depth is not None and self.depth < depth:
            raise ValueError(f"cannot view rankings {self.depth} deep as {depth} deep")
        return RelevantRanks(torch.where(self.ranks <= depth, self.ranks, 0), self.num_relevant, depth)


def count_relevant(
    query_labels: Tensor,
    gallery_labels: Tensor,
    exclude: Tensor | None = None,
    *,
    label_comparison_fn: LabelComparison | None = None,
) -> Tensor:
    """(Q,) number of gallery items relevant to each query, minus the excluded item if it is relevant."""
    return Relevance(query_labels, gallery_labels, exclude, label_comparison_fn).count()


def left_align(ranks: Tensor) -> Tensor:
    """Sort each row's ranks ascending with the 0 padding moved to the right."""
    missing = torch.iinfo(torch.int64).max
    ranks = torch.where(ranks > 0, ranks, missing).sort(dim=1).values
    return torch.where(ranks == missing, 0, ranks)


def ranks_from_ranking(
    ranking: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    num_relevant: Tensor,
    *,
    label_comparison_fn: LabelComparison | None = None,
) -> RelevantRanks:
    """Relevant ranks from a (Q, K) ranking of gallery indices (best first; -1 marks an empty slot)."""
    relevant = Relevance(query_labels, gallery_labels, None, label_comparison_fn).of_ranking(ranking)
    positions = torch.arange(1, ranking.shape[1] + 1, device=ranking.device)
    return RelevantRanks(left_align(torch.where(relevant, positions, 0)), num_relevant, ranking.shape[1])


def already_checked(source: BlockSource) -> BlockSource:
    """The same gallery for a further pass, without re-checking values the first pass checked."""
    again = copy.copy(source)
    again.check_finite = False
    return again


def ranks_exhaustive(
    queries: Tensor,
    query_labels: Tensor,
    gallery: GalleryLike | BlockSource,
    gallery_labels: Tensor,
    *,
    metric: Metric,
    exclude: Tensor | None,
    device: torch.device,
    block_size: int = 4096,
    query_block_size: int = 1024,
    progress: bool = False,
    num_relevant: Tensor | None = None,
    label_comparison_fn: LabelComparison | None = None,
    precision: Precision = "float32",
    stats: SearchStats | None = None,
) -> RelevantRanks:
    """Ranks of every relevant item over the whole gallery by exact score, in two streamed passes.

    The ranking is the exact search's (:mod:`objretrieval.search.exact`): exact scores, ties to the lower
    gallery index, so ranks do not depend on ``block_size``, ``query_block_size``, ``precision``, the device
    or the number of processes. The first pass scores each query's relevant items exactly; the second screens
    every gallery block and counts, for each relevant item, the items ranked above it, scoring exactly only
    the few whose screened score lies within its bound of a relevant item's (:class:`ExactRanks`). Memory
    stays O(Q x P) plus one block; time is O(Q x N x (D + log P)).

    Args:
        num_relevant: (Q,) counts from :func:`count_relevant`, if the caller has them already.
        label_comparison_fn: custom relevance (see :class:`Relevance`); default same label.
        precision: the screening products, ``"float32"`` or ``"bf16-exact"`` (same ranks).
        stats: optional :class:`~objretrieval.search.exact.SearchStats`, counted as
            :func:`~objretrieval.search.knn` counts: ``queries`` grows by Q, ``screened`` by Q x N (the second
            pass screens every pair, an excluded one included), ``rescored`` by the pairs scored exactly
            because their screened score was within the bound of a relevant item's; the relevant items' own
            exact scores (first pass, one per relevant pair) are not counted.
    """
    source = gallery if isinstance(gallery, BlockSource) else BlockSource(gallery, "gallery", block_size)
    if not source.reiterable:
        raise ValueError(
            "exhaustive ranking reads the gallery twice: pass an array, an h5py dataset or a "
            "list of blocks, not a one-shot generator"
        )
    screen = Screen(metric, check_choice(precision, "precision", PRECISIONS))
    check_stats(stats)
    relevance = Relevance(query_labels, gallery_labels, exclude, label_comparison_fn).to(device)
    if num_relevant is None:
        num_relevant = relevance.count()
    num_relevant = num_relevant.to(device)
    width = max(int(num_relevant.max()), 1)
    prepared = prepare(queries, metric, device)
    num_queries = len(prepared)
    if stats is not None:
        stats.precision, stats.queries = precision, stats.queries + num_queries

    def passes(src: BlockSource, desc: str) -> Iterator[tuple[int, Prepared]]:
        return prepared_blocks(src, metric, device, prepared, progress=progress, desc=desc)

    # Pass 1: the exact score and gallery index of every relevant item, left-aligned per query.
    rel_scores = torch.full((num_queries, width), float("inf"), device=device)
    rel_index = torch.full((num_queries, width), -1, dtype=torch.int64, device=device)
    filled = torch.zeros(num_queries, dtype=torch.int64, device=device)
    for col_offset, block in passes(source, "ranking (1/2)"):
        for row_start in range(0, num_queries, query_block_size):
            q = prepared.rows(row_start, row_start + query_block_size)
            rows, cols, scores = relevant_pairs(
                relevance, q.points, row_start, block.points, col_offset, metric
            )
            if rows.numel() == 0:
                continue
            per_row = torch.bincount(rows, minlength=len(q))
            global_rows = rows + row_start
            slot = (
                filled[global_rows]
                + torch.arange(rows.numel(), device=device)
                - (per_row.cumsum(0) - per_row)[rows]
            )
            rel_scores[global_rows, slot] = scores
            rel_index[global_rows, slot] = cols + col_offset
            filled[row_start : row_start + len(q)] += per_row

    # Pass 2: screen every block and count the items ranked above each relevant item.
    counter = ExactRanks(rel_scores, rel_index, stats)
    qs = screen.rows(prepared, "queries")
    buffer = screen.buffer(min(query_block_size, num_queries), source.block_size, device)
    for col_offset, g_prepared in passes(already_checked(source), "ranking (2/2)"):
        g = screen.rows(g_prepared, source.name, col_offset)
        for row_start in range(0, num_queries, query_block_size):
            q_rows = qs.rows(row_start, row_start + query_block_size)
            counter.update(row_start, col_offset, q_rows, g, screen, relevance.exclude, buffer)
    return RelevantRanks(left_align(counter.ranks()), num_relevant, None)


def relevant_pairs(
    relevance: Relevance,
    query_points: Tensor,
    row_start: int,
    gallery_points: Tensor,
    col_offset: int,
    metric: Metric,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, exact scores)`` of the relevant pairs of a block of queries (rows from ``row_start``) and
    gallery items (columns from ``col_offset``), local indices, row-major; excluded pairs left out."""
    hit = relevance.block(row_start, len(query_points), col_offset, len(gallery_points))
    rows, cols = hit.nonzero(as_tuple=True)
    if relevance.exclude is not None:
        keep = relevance.exclude[rows + row_start] != cols + col_offset
        rows, cols = rows[keep], cols[keep]
    return rows, cols, exact_pair_scores(query_points, gallery_points, rows, cols, metric)
