"""Nearest neighbours under a pairwise score that is not an inner product of embeddings (AMES, AVSL).

A :class:`PairwiseScorer` scores (query, gallery) pairs; one that can score dense blocks more cheaply than pair by
pair also implements :class:`BlockScorer`. Two walks use them:

- :func:`score_candidates` scores a shortlist of gallery ids per query (the rescoring of :func:`pairwise_knn`
  with ``candidates``, and the reranking of :func:`objretrieval.reranking.score_shortlist`);
- :func:`pairwise_knn` without candidates walks query blocks x gallery blocks with a running top-k, so memory is
  O(Q x k) plus one block, never the Q x N matrix. A symmetric scorer on one set (leave-one-out) computes each
  pair once and mirrors the block.

Both walks can share their work over the ranks of a process group (``group=``): each rank makes a contiguous run
of the calls to the scorer that one process would make (blocks, or chunks of pairs in query order); the ranks'
top-k lists are merged by (score, index), or their pair scores gathered in order. Every pair is thus scored by
the same call as in one process, so the result is identical to one process's, whatever the scorer computes in
batches.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval._validation import check_finite_values, check_positive_int
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    check_on_every_rank,
    shard_range,
    world_size,
)
from objretrieval.progress import show_progress
from objretrieval.search.knn import Neighbors
from objretrieval.search.scoring import mask_excluded
from objretrieval.search.topk import RunningTopK, sort_by_score_then_index

T = TypeVar("T")


@runtime_checkable
class PairwiseScorer(Protocol):
    """Scores of query items against gallery items; higher is better.

    The core every pairwise model implements. A scorer may also set ``symmetric = True`` when its gallery is its
    query set and ``score(i, j) == score(j, i)``; :func:`pairwise_knn` then computes each pair once.

    Attributes:
        num_queries: Q.
        num_gallery: N.
        device: where scores are computed and returned.
    """

    @property
    def num_queries(self) -> int: ...

    @property
    def num_gallery(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def score_pairs(self, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
        """(P,) float32 scores of the pairs ``(query_ids[i], gallery_ids[i])``, on :attr:`device`."""
        ...


@runtime_checkable
class BlockScorer(PairwiseScorer, Protocol):
    """A :class:`PairwiseScorer` that scores dense blocks directly (e.g. with one batched product)."""

    def score_block(self, query_rows: slice, gallery_rows: slice) -> Tensor:
        """(q, g) float32 scores of a contiguous block of queries against one of gallery items."""
        ...


def score_block(scorer: PairwiseScorer, query_rows: slice, gallery_rows: slice) -> Tensor:
    """(q, g) scores of a block: the scorer's own :meth:`BlockScorer.score_block`, else pair by pair."""
    rows = torch.arange(scorer.num_queries, device=scorer.device)[query_rows]
    cols = torch.arange(scorer.num_gallery, device=scorer.device)[gallery_rows]
    if isinstance(scorer, BlockScorer):
        return _checked(
            scorer.score_block(query_rows, gallery_rows), (len(rows), len(cols)), scorer, "score_block"
        )
    q, g = rows.repeat_interleave(len(cols)), cols.repeat(len(rows))
    return _checked_scores(scorer, q, g).view(len(rows), len(cols))


def check_pairs(scorer: PairwiseScorer, query_ids: Tensor, gallery_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(query_ids, gallery_ids)`` as int64 on the scorer's device, after checking shapes and ranges."""
    for name, ids, size in (
        ("query_ids", query_ids, scorer.num_queries),
        ("gallery_ids", gallery_ids, scorer.num_gallery),
    ):
        if not isinstance(ids, Tensor) or ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            what = (
                f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            )
            raise TypeError(f"{name} must be a 1-D integer tensor, got {what}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise ValueError(
                f"{name} must lie in [0, {size}), got min {int(ids.min())}, max {int(ids.max())}"
            )
    if query_ids.shape != gallery_ids.shape:
        raise ValueError(
            f"query_ids and gallery_ids must pair up, got {len(query_ids)} and {len(gallery_ids)} ids"
        )
    return query_ids.to(scorer.device, torch.int64), gallery_ids.to(scorer.device, torch.int64)


def _checked_scores(scorer: PairwiseScorer, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
    return _checked(scorer.score_pairs(query_ids, gallery_ids), tuple(query_ids.shape), scorer, "score_pairs")


def _checked(values: Any, shape: tuple[int, ...], scorer: PairwiseScorer, method: str) -> Tensor:
    """A scorer's output as float32, refusing a wrong shape or NaN/inf (which would rank first or last)."""
    if not isinstance(values, Tensor) or tuple(values.shape) != shape:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"{type(scorer).__name__}.{method} must return {shape} scores, got {got}")
    check_finite_values(values, f"scores from {type(scorer).__name__}")
    return values.float()


def _my_share(units: range, group: Group | None) -> range:
    """This rank's contiguous run of ``units`` (all of them without a group)."""
    if group is None:
        return units
    mine = shard_range(len(units), group)
    return units[mine.start : mine.stop]


def _gather(x: Tensor, group: Group | None, name: str) -> Tensor:
    """Every rank's ``x`` concatenated in rank order (``x`` itself without a group)."""
    return x if group is None else all_gather_uneven(x, group, name)[0]


def _on_every_rank(check: Callable[[], tuple[T, Hashable]], what: str, group: Group | None) -> T:
    """``check()``'s result; with a group, a failure on one rank (bad arguments, a scorer's NaN) or ranks
    given different arguments raise on every rank instead of leaving the others in the next exchange."""
    return check()[0] if group is None else check_on_every_rank(check, what, group)


def _sizes(scorer: PairwiseScorer) -> tuple[tuple[str, int], ...]:
    return ("num_queries", int(scorer.num_queries)), ("num_gallery", int(scorer.num_gallery))


def _fingerprint(ids: Tensor) -> int:
    """An order-sensitive checksum of integer ids (int64 arithmetic wraps around, which is fine for it)."""
    flat = ids.flatten()
    return int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum()) if flat.numel() else 0


def score_candidates(
    scorer: PairwiseScorer,
    candidates: Tensor,
    *,
    exclude_self: bool = False,
    fill: float = float("-inf"),
    chunk_size: int = 4096,
    progress: bool | None = None,
    group: Group | None = None,
) -> Tensor:
    """(Q, S) float32 scores of each query against its candidate gallery ids, on the scorer's device.

    Pairs go to :meth:`PairwiseScorer.score_pairs` ``chunk_size`` at a time in row order, so a scorer sees the
    pairs of one query together (AMES projects each query once).

    Args:
        scorer: a :class:`PairwiseScorer`.
        candidates: (Q, S) integer gallery ids; -1 marks a missing entry (a short row, or an approximate faiss
            index that found fewer neighbours), which is not scored.
        exclude_self: leave-one-out on one set: candidate ``i`` of query ``i`` is not scored either.
        fill: the score of entries not scored.
        chunk_size: pairs per :meth:`~PairwiseScorer.score_pairs` call.
        progress: a bar over the chunks; None (the default): only for 1e5 scored pairs or more
            (:func:`objretrieval.progress.show_progress`).
        group: share the pairs over this process group's ranks (e.g. ``torch.distributed.group.WORLD``): each
            rank scores a contiguous run of the chunks one process would score (the pairs in query order), and
            every rank receives all scores, identical to one process's. A smaller ``chunk_size`` evens out the
            shares when there are few chunks. Every rank must pass the same scorer and candidates (their sizes
            and the candidates are checked). None: this process scores every pair.
    """
    q, n = int(scorer.num_queries), int(scorer.num_gallery)

    def check() -> tuple[tuple[Tensor, Tensor, Tensor, int], Hashable]:
        size = check_positive_int(chunk_size, "chunk_size")
        if not isinstance(candidates, Tensor) or candidates.dim() != 2 or candidates.shape[0] != q:
            shape = tuple(candidates.shape) if isinstance(candidates, Tensor) else type(candidates).__name__
            raise ValueError(f"candidates must be a ({q}, S) tensor of gallery ids, got {shape}")
        if candidates.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"candidates must hold integer gallery ids, got {candidates.dtype}")
        ids = candidates.to(scorer.device, torch.int64)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
            raise ValueError(
                f"candidates hold ids outside [-1, {n}): min {int(ids.min())}, max {int(ids.max())}"
            )
        rows = torch.arange(q, device=ids.device)[:, None].expand_as(ids)
        scored = ids >= 0
        if exclude_self:
            scored &= ids != rows
        plan = (("candidates", _fingerprint(ids)), ("exclude_self", exclude_self), ("chunk_size", size))
        return (ids, rows, scored, size), (*_sizes(scorer), *plan)

    ids, rows, scored, size = _on_every_rank(check, "score_candidates", group)
    flat_rows, flat_ids = rows[scored], ids[scored]
    show = show_progress(progress, len(flat_rows), "scorer_pairs")
    scores = torch.full(ids.shape, fill, device=ids.device)
    if len(flat_rows):

        def my_scores() -> tuple[Tensor, Hashable]:
            parts = [
                _checked_scores(scorer, flat_rows[s : s + size], flat_ids[s : s + size])
                for s in _bar(_my_share(range(0, len(flat_rows), size), group), show, "chunk")
            ]
            return torch.cat(parts) if parts else scores.new_empty(0), ()

        mine = _on_every_rank(my_scores, "score_candidates", group)
        scores[scored] = _gather(mine, group, "pair scores")
    return scores


def pairwise_knn(
    scorer: PairwiseScorer,
    k: int,
    *,
    exclude_self: bool = False,
    candidates: Tensor | None = None,
    query_block_size: int = 32,
    gallery_block_size: int = 32,
    pair_chunk_size: int = 4096,
    progress: bool | None = None,
    group: Group | None = None,
) -> Neighbors:
    """The ``k`` best-scoring gallery items of every query under a pairwise scorer.

    Ties rank the lower gallery index first, as :func:`objretrieval.search.knn` does, so results do not depend
    on block sizes. Scorers without :meth:`BlockScorer.score_block` have each block scored pair by pair.

    Args:
        scorer: a :class:`PairwiseScorer`.
        k: neighbours per query (at most the number of gallery items left after exclusion).
        exclude_self: leave-one-out on one set: query i never retrieves gallery item i.
        candidates: optional (Q, S) int64 gallery ids to rescore instead of the whole gallery (-1 marks a
            missing entry); the result ranks only those (:func:`score_candidates`).
        query_block_size: queries per block (exhaustive mode); with a symmetric scorer, blocks are square.
        gallery_block_size: gallery items per block (exhaustive mode, non-symmetric scorers).
        pair_chunk_size: pairs scored per call in candidates mode.
        progress: show a progress bar; None (the default): only for 1e5 scored pairs or more (Q x N, or the
            candidates) (:func:`objretrieval.progress.show_progress`).
        group: share the work over this process group's ranks (e.g. ``torch.distributed.group.WORLD``):
            each rank scores a contiguous run of the blocks one process would score (the symmetric walk's
            too, mirror included; candidates mode: of the pair chunks, :func:`score_candidates`), and every
            rank receives the neighbours of all queries, merged by (score, index): identical to one
            process's. Each rank holds O(Q x k), the exchange O(Q x k x world). Every rank must pass the same
            scorer and arguments (their sizes are checked). None: this process scores everything.

    Returns:
        :class:`~objretrieval.search.Neighbors` with (Q, k) scores (higher is better) and gallery indices;
        in candidates mode, rows with fewer than k valid candidates end in index -1 and score -inf.
    """
    q, n = int(scorer.num_queries), int(scorer.num_gallery)

    def check() -> tuple[tuple[int, int, int, bool], Hashable]:
        checked_k = check_positive_int(k, "k")
        qbs = check_positive_int(query_block_size, "query_block_size")
        gbs = check_positive_int(gallery_block_size, "gallery_block_size")
        if exclude_self and q != n:
            raise ValueError(f"exclude_self needs as many queries as gallery items, got {q} and {n}")
        available = n - 1 if exclude_self else n
        if candidates is None and checked_k > available:
            raise ValueError(f"k={checked_k} exceeds the {available} gallery items each query can retrieve")
        symmetric = bool(getattr(scorer, "symmetric", False)) and exclude_self
        plan = (("k", checked_k), ("exclude_self", exclude_self), ("symmetric", symmetric))
        blocks = (("query_block_size", qbs), ("gallery_block_size", gbs))
        return (checked_k, qbs, gbs, symmetric), (*_sizes(scorer), *plan, *blocks)

    k, query_block_size, gallery_block_size, symmetric = _on_every_rank(check, "pairwise_knn", group)
    if candidates is not None:
        return _rescore(scorer, k, candidates, exclude_self, pair_chunk_size, progress, group)
    exclude = torch.arange(q, device=scorer.device) if exclude_self else None
    top = RunningTopK(q, k, scorer.device)
    show = show_progress(progress, q * n, "scorer_pairs")

    def search() -> tuple[RunningTopK, Hashable]:
        if symmetric:
            size = query_block_size
            starts = range(0, q, size)
            tiles = [(i, j) for i in starts for j in starts if j >= i]
            for i, j in _bar(_my_tiles(tiles, group), show, "block"):
                s = score_block(scorer, slice(i, i + size), slice(j, j + size))
                s = _without_excluded(s, exclude, i, j)
                top.update(i, s, j)
                if j > i:
                    top.update(j, s.T, i)
            return top, ()
        blocks = [(i, j) for j in range(0, n, gallery_block_size) for i in range(0, q, query_block_size)]
        for i, j in _bar(_my_tiles(blocks, group), show, "block"):
            s = score_block(scorer, slice(i, i + query_block_size), slice(j, j + gallery_block_size))
            top.update(i, _without_excluded(s, exclude, i, j), j)
        return top, ()

    return _merge_ranks(_on_every_rank(search, "pairwise_knn", group), group)


def _without_excluded(block: Tensor, exclude: Tensor | None, row_start: int, col_offset: int) -> Tensor:
    """``block`` with each query's own column at -inf (leave-one-out), copied first if it has one: a scorer's
    block may be a view of its own data (a :class:`~objretrieval.reranking.TableScorer`'s table)."""
    rows, cols = block.shape
    if exclude is None or max(row_start, col_offset) >= min(row_start + rows, col_offset + cols):
        return block  # the exclusion is i -> i: only blocks crossing the diagonal hold excluded pairs
    block = block.clone()
    mask_excluded(block, exclude, row_start, col_offset)
    return block


def _bar(units: Sequence[T], show: bool, unit: str) -> Iterable[T]:
    """``units`` (this rank's share of the blocks or pair chunks) behind a bar if ``show``: with a group,
    each rank draws the bar of its own share, which says how far that rank is."""
    return tqdm(units, disable=not show, desc="pairwise", unit=unit)


def _my_tiles(tiles: list[tuple[int, int]], group: Group | None) -> list[tuple[int, int]]:
    """This rank's contiguous run of the blocks one process would score (all of them without a group)."""
    mine = _my_share(range(len(tiles)), group)
    return tiles[mine.start : mine.stop]


def _merge_ranks(top: RunningTopK, group: Group | None) -> Neighbors:
    """Every rank's top-k of each row merged into the top-k of all, ranked by (score, index) as one process.

    Each (query, gallery) pair lies in one rank's blocks, so the k best of the ranks' k best are the k best.
    """
    if group is None:
        return Neighbors(top.scores, top.indices)
    q, k = top.scores.shape

    def side_by_side(x: Tensor, name: str) -> Tensor:  # (world * q, k), rank after rank -> (q, world * k)
        return _gather(x, group, name).view(world_size(group), q, k).permute(1, 0, 2).reshape(q, -1)

    scores, indices = sort_by_score_then_index(
        side_by_side(top.scores, "scores"), side_by_side(top.indices, "indices")
    )
    return Neighbors(scores[:, :k].contiguous(), indices[:, :k].contiguous())


def _rescore(
    scorer: PairwiseScorer,
    k: int,
    candidates: Tensor,
    exclude_self: bool,
    chunk: int,
    progress: bool | None,
    group: Group | None,
) -> Neighbors:
    scores = score_candidates(
        scorer, candidates, exclude_self=exclude_self, chunk_size=chunk, progress=progress, group=group
    )
    ids = candidates.to(scores.device, torch.int64)
    ids = torch.where(torch.isneginf(scores), -1, ids)  # not scored (missing or the query itself): missing
    scores, ids = sort_by_score_then_index(scores, ids)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], dim=1)
    return Neighbors(scores[:, :k], ids[:, :k])
