"""Ranks of the relevant items: the one representation every ranking metric is computed from.

Recall@K, precision@1, R-precision, MAP@R, mAP and the revisited Oxford/Paris AP are all functions of *where
each query's relevant items landed* in its ranking. :class:`RelevantRanks` stores exactly that, O(Q x P) for P
relevant items per query, whether it comes from a kNN shortlist, a precomputed ranking or an exhaustive
streamed count over the whole gallery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from objretrieval.search.scoring import Metric, iter_scores, prepare
from objretrieval.search.sources import BlockSource, GalleryLike

# Bound on the (rows x gallery block x relevant items) comparison tensor of the exhaustive count.
_COMPARE_BUDGET = 1 << 25


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


def count_relevant(query_labels: Tensor, gallery_labels: Tensor, exclude: Tensor | None = None) -> Tensor:
    """(Q,) number of gallery items sharing each query's label, minus the excluded item if it shares it."""
    classes, counts = torch.unique(gallery_labels, return_counts=True)
    slot = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    n = torch.where(classes[slot] == query_labels, counts[slot], torch.zeros_like(counts[slot]))
    if exclude is not None:
        has = exclude >= 0
        excluded_is_relevant = torch.zeros_like(has)
        excluded_is_relevant[has] = gallery_labels[exclude[has]] == query_labels[has]
        n = n - excluded_is_relevant.long()
    return n


def left_align(ranks: Tensor) -> Tensor:
    """Sort each row's ranks ascending with the 0 padding moved to the right."""
    missing = torch.iinfo(torch.int64).max
    ranks = torch.where(ranks > 0, ranks, missing).sort(dim=1).values
    return torch.where(ranks == missing, 0, ranks)


def ranks_from_ranking(
    ranking: Tensor, query_labels: Tensor, gallery_labels: Tensor, num_relevant: Tensor
) -> RelevantRanks:
    """Relevant ranks from a (Q, K) ranking of gallery indices (best first; -1 marks an empty slot)."""
    valid = ranking >= 0
    retrieved = gallery_labels[ranking.clamp(min=0)]
    relevant = valid & (retrieved == query_labels[:, None])
    positions = torch.arange(1, ranking.shape[1] + 1, device=ranking.device)
    return RelevantRanks(left_align(torch.where(relevant, positions, 0)), num_relevant, ranking.shape[1])


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
) -> RelevantRanks:
    """Exact ranks of every relevant item over the whole gallery, in two streamed passes.

    The first pass collects each query's scores for its relevant items; the second counts, for each of them,
    the gallery items ranked above it under the (score descending, index ascending) order. Memory stays
    O(Q x P); time is O(Q x N x (D + P)).
    """
    source = gallery if isinstance(gallery, BlockSource) else BlockSource(gallery, "gallery", block_size)
    if not source.reiterable:
        raise ValueError(
            "exhaustive ranking reads the gallery twice: pass an array, an h5py dataset or a "
            "list of blocks, not a one-shot generator"
        )
    query_labels = query_labels.to(device)
    gallery_labels = gallery_labels.to(device)
    if exclude is not None:
        exclude = exclude.to(device)
    num_relevant = count_relevant(query_labels, gallery_labels, exclude)
    width = max(int(num_relevant.max()), 1)
    prepared = prepare(queries, metric, device)
    num_queries = queries.shape[0]

    def passes(desc: str):
        return iter_scores(
            prepared,
            source,
            metric,
            device=device,
            query_block_size=query_block_size,
            exclude=exclude,
            progress=progress,
            desc=desc,
        )

    # Pass 1: the score and gallery index of every relevant item, left-aligned per query.
    rel_scores = torch.full((num_queries, width), float("inf"), device=device)
    rel_index = torch.full((num_queries, width), -1, dtype=torch.int64, device=device)
    filled = torch.zeros(num_queries, dtype=torch.int64, device=device)
    for row_start, col_offset, s in passes("ranking (1/2)"):
        labels = gallery_labels[col_offset : col_offset + s.shape[1]]
        hit = (labels[None, :] == query_labels[row_start : row_start + s.shape[0], None]) & (
            s > float("-inf")
        )
        rows, cols = hit.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        per_row = torch.bincount(rows, minlength=s.shape[0])
        first = torch.cumsum(per_row, 0) - per_row
        global_rows = rows + row_start
        slot = filled[global_rows] + torch.arange(rows.numel(), device=device) - first[rows]
        rel_scores[global_rows, slot] = s[rows, cols]
        rel_index[global_rows, slot] = cols + col_offset
        filled[row_start : row_start + s.shape[0]] += per_row

    # Pass 2: count the items ranked above each relevant item.
    above = torch.zeros((num_queries, width), dtype=torch.int64, device=device)
    for row_start, col_offset, s in passes("ranking (2/2)"):
        cols = torch.arange(col_offset, col_offset + s.shape[1], device=device)[None, :, None]
        chunk = max(1, _COMPARE_BUDGET // (s.shape[1] * width))
        for r in range(0, s.shape[0], chunk):
            rows = slice(row_start + r, row_start + r + chunk)
            block = s[r : r + chunk, :, None]
            score, index = rel_scores[rows][:, None, :], rel_index[rows][:, None, :]
            ranked_above = (block > score) | ((block == score) & (cols < index))
            above[rows] += (ranked_above & (cols != index)).sum(dim=1)

    return RelevantRanks(left_align(torch.where(rel_index >= 0, above + 1, 0)), num_relevant, None)
