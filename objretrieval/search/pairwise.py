"""Nearest neighbours under a pairwise score that is not an inner product of embeddings (AVSL, cross-encoders).

A :class:`PairwiseScorer` scores a block of queries against a block of gallery items; :func:`pairwise_knn`
walks query blocks x gallery blocks with a running top-k, so memory is O(Q x k) plus one block, never the
Q x N matrix. A symmetric scorer on one set (leave-one-out) computes each pair once and mirrors the block.
With ``candidates`` only a shortlist per query is rescored (e.g. the kNN of a cheap global embedding).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval._validation import check_positive_int
from objretrieval.search.knn import Neighbors
from objretrieval.search.scoring import mask_excluded
from objretrieval.search.topk import RunningTopK, sort_by_score_then_index


@runtime_checkable
class PairwiseScorer(Protocol):
    """Scores of query items against gallery items; higher is better.

    Attributes:
        num_queries: Q.
        num_gallery: N.
        symmetric: the gallery is the query set and ``score(i, j) == score(j, i)``.
        device: where scores are computed and returned.
    """

    num_queries: int
    num_gallery: int
    symmetric: bool
    device: torch.device

    def score_block(self, query_rows: slice, gallery_rows: slice) -> Tensor:
        """(q, g) float32 scores of a contiguous block of queries against one of gallery items."""
        ...

    def score_pairs(self, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
        """(P,) float32 scores of the pairs ``(query_ids[i], gallery_ids[i])``."""
        ...


def pairwise_knn(
    scorer: PairwiseScorer,
    k: int,
    *,
    exclude_self: bool = False,
    candidates: Tensor | None = None,
    query_block_size: int = 32,
    gallery_block_size: int = 32,
    pair_chunk_size: int = 4096,
    progress: bool = False,
) -> Neighbors:
    """The ``k`` best-scoring gallery items of every query under a pairwise scorer.

    Ties rank the lower gallery index first, as :func:`objretrieval.search.knn` does, so results do not depend
    on block sizes.

    Args:
        scorer: a :class:`PairwiseScorer`.
        k: neighbours per query (at most the number of gallery items left after exclusion).
        exclude_self: leave-one-out on one set: query i never retrieves gallery item i.
        candidates: optional (Q, S) int64 gallery ids to rescore instead of the whole gallery (-1 pads a short
            row); the result ranks only those.
        query_block_size: queries per block (exhaustive mode); with a symmetric scorer, blocks are square.
        gallery_block_size: gallery items per block (exhaustive mode, non-symmetric scorers).
        pair_chunk_size: pairs scored per call in candidates mode.
        progress: show a progress bar.

    Returns:
        :class:`~objretrieval.search.Neighbors` with (Q, k) scores (higher is better) and gallery indices;
        in candidates mode, rows with fewer than k valid candidates end in index -1 and score -inf.
    """
    q, n = int(scorer.num_queries), int(scorer.num_gallery)
    k = check_positive_int(k, "k")
    query_block_size = check_positive_int(query_block_size, "query_block_size")
    gallery_block_size = check_positive_int(gallery_block_size, "gallery_block_size")
    if exclude_self and q != n:
        raise ValueError(f"exclude_self needs as many queries as gallery items, got {q} and {n}")
    if candidates is not None:
        return _rescore(scorer, k, candidates, exclude_self, pair_chunk_size)
    available = n - 1 if exclude_self else n
    if k > available:
        raise ValueError(f"k={k} exceeds the {available} gallery items each query can retrieve")
    exclude = torch.arange(q, device=scorer.device) if exclude_self else None
    top = RunningTopK(q, k, scorer.device)
    if scorer.symmetric and exclude_self:
        size = query_block_size
        starts = range(0, q, size)
        tiles = [(i, j) for i in starts for j in starts if j >= i]
        for i, j in tqdm(tiles, disable=not progress, desc="pairwise", unit="block"):
            s = scorer.score_block(slice(i, i + size), slice(j, j + size))
            if i == j:
                mask_excluded(s, exclude, i, j)
            top.update(i, s, j)
            if j > i:
                top.update(j, s.T, i)
        return Neighbors(top.scores, top.indices)
    blocks = [(i, j) for j in range(0, n, gallery_block_size) for i in range(0, q, query_block_size)]
    for i, j in tqdm(blocks, disable=not progress, desc="pairwise", unit="block"):
        s = scorer.score_block(slice(i, i + query_block_size), slice(j, j + gallery_block_size))
        mask_excluded(s, exclude, i, j)
        top.update(i, s, j)
    return Neighbors(top.scores, top.indices)


def _rescore(scorer: PairwiseScorer, k: int, candidates: Tensor, exclude_self: bool, chunk: int) -> Neighbors:
    q, n = scorer.num_queries, scorer.num_gallery
    if not isinstance(candidates, Tensor) or candidates.dim() != 2 or candidates.shape[0] != q:
        shape = tuple(candidates.shape) if isinstance(candidates, Tensor) else type(candidates).__name__
        raise ValueError(f"candidates must be a ({q}, S) tensor of gallery ids, got {shape}")
    if candidates.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"candidates must hold integer gallery ids, got {candidates.dtype}")
    ids = candidates.to(scorer.device, torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
        raise ValueError(f"candidates hold ids outside [-1, {n}): min {int(ids.min())}, max {int(ids.max())}")
    rows = torch.arange(q, device=ids.device)[:, None].expand_as(ids)
    valid = ids >= 0
    if exclude_self:
        valid &= ids != rows
    scores = torch.full(ids.shape, float("-inf"), device=ids.device)
    flat_rows, flat_ids = rows[valid], ids[valid]
    values = torch.cat(
        [
            scorer.score_pairs(flat_rows[s : s + chunk], flat_ids[s : s + chunk])
            for s in range(0, len(flat_rows), chunk)
        ]
        or [torch.empty(0, device=ids.device)]
    )
    scores[valid] = values.float()
    ids = torch.where(valid, ids, -1)
    scores, ids = sort_by_score_then_index(scores, ids)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = torch.cat([scores, scores.new_full((q, pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((q, pad), -1)], dim=1)
    return Neighbors(scores[:, :k], ids[:, :k])
