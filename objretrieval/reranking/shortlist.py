"""The global shortlist, pairwise scores along it, and their fusion into a reranked list.

``lamb * global + (1 - lamb) * sigmoid(temp * raw)`` re-sorts the first ``k`` shortlisted images of each query;
the rest keeps the global order. Missing shortlist entries (index -1: an approximate faiss index found fewer
neighbours than asked) are never scored and always rank last, keeping index -1.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from objretrieval._validation import check_finite_values, check_number, check_positive_int, to_tensor
from objretrieval.display import SummaryRepr
from objretrieval.distributed.world import Group
from objretrieval.search.pairwise import PairwiseScorer, check_pairs, score_candidates

#: Index of a missing shortlist entry, as faiss returns it.
MISSING = -1


class NeighborsLike(Protocol):
    """Anything with (Q, K) ``scores`` and ``indices``: a :class:`Shortlist` or a search's ``Neighbors``."""

    @property
    def scores(self) -> Tensor: ...

    @property
    def indices(self) -> Tensor: ...


@dataclass(frozen=True, repr=False)
class Shortlist(SummaryRepr):
    """The global kNN shortlist of each query, best first.

    ``Shortlist(*knn(...))`` or ``Shortlist.of(knn(...))`` builds one from a search's ``Neighbors``; every
    reranking function also takes the ``Neighbors`` themselves. Missing entries (index -1) are moved behind the
    real ones of their row, keeping the order of both.

    Attributes:
        scores: (Q, K) float global similarities, descending along each row (missing entries aside).
        indices: (Q, K) int64 database ids, -1 for a missing entry.
        check_order: refuse rows whose scores are not descending; off for shortlists reordered on purpose
            (:meth:`move_to_end`).
    """

    scores: Tensor
    indices: Tensor
    check_order: InitVar[bool] = True

    def __post_init__(self, check_order: bool) -> None:
        scores, indices = to_tensor(self.scores, "scores"), to_tensor(self.indices, "indices")
        if scores.shape != indices.shape or scores.ndim != 2:
            raise ValueError(
                f"scores and indices must both be (Q, K), got {tuple(scores.shape)} and {tuple(indices.shape)}"
            )
        if not scores.is_floating_point():
            raise TypeError(f"scores must be floating point similarities, got {scores.dtype}")
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(f"indices must hold integer database ids, got {indices.dtype}")
        indices = indices.to(torch.int64)
        if indices.numel() and int(indices.min()) < MISSING:
            raise ValueError(
                f"indices must be database ids >= 0, or -1 for a missing entry; got {int(indices.min())}"
            )
        present = indices != MISSING
        if not bool(present[:, 1:].le(present[:, :-1]).all()):  # a missing entry before a real one
            order = (~present).to(torch.int8).argsort(dim=1, stable=True)
            scores, indices, present = (
                scores.gather(1, order),
                indices.gather(1, order),
                present.gather(1, order),
            )
        check_finite_values(torch.where(present, scores, 0), "scores")
        if check_order:
            rising = present[:, 1:] & (scores[:, 1:] > scores[:, :-1])
            if bool(rising.any()):
                row, col = (int(v) for v in rising.nonzero()[0])
                raise ValueError(
                    f"shortlist scores must be descending along each row (best first): row {row} has "
                    f"{float(scores[row, col]):g} before {float(scores[row, col + 1]):g}; pass similarities "
                    "(not l2 distances) in the order the search returned them"
                )
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "indices", indices)

    @classmethod
    def of(cls, shortlist: NeighborsLike | tuple[Any, Any]) -> Shortlist:
        """A :class:`Shortlist` from itself, a search's ``Neighbors`` or a ``(scores, indices)`` pair."""
        if isinstance(shortlist, Shortlist):
            return shortlist
        scores, indices = getattr(shortlist, "scores", None), getattr(shortlist, "indices", None)
        if scores is None or indices is None:
            if not (isinstance(shortlist, tuple) and len(shortlist) == 2):
                raise TypeError(
                    "shortlist must be a Shortlist, a search's Neighbors or (scores, indices), "
                    f"got {type(shortlist).__name__}"
                )
            scores, indices = shortlist
        return cls(scores, indices)

    @classmethod
    def from_official(cls, cache_nn: Any) -> Shortlist:
        """From AMES's ``nn_superglobal.pkl`` layout: (2, Q, K), similarities then ids stored as floats."""
        t = to_tensor(cache_nn, "cache_nn")
        if t.ndim != 3 or t.shape[0] != 2:
            raise ValueError(f"cache_nn must be (2, num_queries, K), got {tuple(t.shape)}")
        return cls(t[0].float(), t[1].round().long())

    def summary_fields(self) -> dict[str, Any]:
        """What the repr shows: ``Shortlist(queries=70, depth=100, missing=0)``."""
        num_queries, depth = self.indices.shape
        return {"queries": num_queries, "depth": depth, "missing": self.num_missing}

    @property
    def missing(self) -> Tensor:
        """(Q, K) bool, True at missing entries (index -1)."""
        return self.indices == MISSING

    @property
    def num_missing(self) -> int:
        """How many entries are missing, over all queries."""
        return int(self.missing.sum())

    def move_to_end(self, ids: Sequence[Sequence[int]]) -> Shortlist:
        """Move each query's listed database ids to the end of its shortlist (before missing entries).

        Relative order is kept. This is how AMES (after DELG) excludes junk images from reranking: junk for the
        Medium protocol, junk and easy images for Hard.
        """
        if len(ids) != self.indices.shape[0]:
            raise ValueError(
                f"got id lists for {len(ids)} queries, the shortlist has {self.indices.shape[0]}"
            )
        order = []
        for row, listed in zip(self.indices.cpu().numpy(), ids, strict=True):
            moved = np.isin(row, np.asarray(listed, dtype=np.int64))
            absent = row == MISSING
            order.append(
                np.concatenate(
                    [np.flatnonzero(~moved & ~absent), np.flatnonzero(moved), np.flatnonzero(absent)]
                )
            )
        perm = torch.from_numpy(np.stack(order)).to(self.indices.device)
        return Shortlist(self.scores.gather(1, perm), self.indices.gather(1, perm), check_order=False)


ShortlistLike = Shortlist | NeighborsLike


def _check_k(k: Any, shortlist: Shortlist) -> int:
    k = check_positive_int(k, "k")
    if k > shortlist.indices.shape[1]:
        raise ValueError(f"k must be in [1, {shortlist.indices.shape[1]}] (the shortlist length), got {k}")
    return k


def score_shortlist(
    scorer: PairwiseScorer,
    shortlist: ShortlistLike,
    k: int,
    *,
    chunk_size: int = 4096,
    progress: bool | None = None,
    group: Group | None = None,
) -> Tensor:
    """(Q, k) float32 raw pairwise scores (CPU) of each query against its first k shortlisted images.

    Missing entries are not scored: their raw score is NaN (and a warning counts them).

    Args:
        scorer: e.g. an :class:`~objretrieval.reranking.AMESScorer`.
        shortlist: the global shortlist.
        k: how many of each query's shortlisted images to score.
        chunk_size: pairs per call to the scorer.
        progress: a bar over the chunks of pairs; None (the default): only for 1e5 scored pairs or more
            (:func:`objretrieval.progress.show_progress`).
        group: share the queries over this process group's ranks (e.g. ``torch.distributed.group.WORLD``):
            each rank scores a contiguous run of the pairs, in query order, and every rank receives all
            scores, identical to one process's (:func:`~objretrieval.search.pairwise.score_candidates`). Every
            rank passes the same scorer and shortlist. None: this process scores everything.
    """
    shortlist = Shortlist.of(shortlist)
    k = _check_k(k, shortlist)
    if scorer.num_queries != shortlist.indices.shape[0]:
        raise ValueError(
            f"the scorer has {scorer.num_queries} queries but the shortlist {shortlist.indices.shape[0]} rows"
        )
    head = shortlist.indices[:, :k]
    missing = int((head == MISSING).sum())
    if missing:
        warnings.warn(
            f"{missing} of the first {k} shortlist entries per query are missing (index -1, e.g. an approximate "
            "faiss index found fewer neighbours): they are not scored and rank last",
            stacklevel=2,
        )
    return score_candidates(
        scorer, head, fill=float("nan"), chunk_size=chunk_size, progress=progress, group=group
    ).cpu()


def fuse(global_scores: Tensor, raw: Tensor, lamb: float, temp: float) -> Tensor:
    """``lamb * global + (1 - lamb) * sigmoid(temp * raw)``, elementwise.

    Args:
        lamb: weight of the global similarity, in [0, 1].
        temp: sigmoid temperature of the pairwise logits, > 0.
    """
    lamb = check_number(lamb, "lamb", low=0.0, high=1.0)
    temp = check_number(temp, "temp", low=0.0, low_open=True)
    return lamb * global_scores + (1.0 - lamb) * torch.sigmoid(temp * raw)


def rerank(shortlist: ShortlistLike, raw: Tensor, k: int, lamb: float, temp: float) -> Tensor:
    """(Q, K) ranking: the first k shortlisted images re-sorted by fused score, the rest in global order.

    Missing entries (index -1) stay -1 and rank after every real one.

    Args:
        shortlist: the global shortlist.
        raw: (Q, >= k) pairwise scores along the shortlist (any value, e.g. NaN, at missing entries).
        k: how many to rerank.
        lamb: weight of the global similarity, in [0, 1].
        temp: sigmoid temperature of the pairwise logits, > 0.
    """
    shortlist = Shortlist.of(shortlist)
    k = _check_k(k, shortlist)
    raw = to_tensor(raw, "raw")
    if raw.ndim != 2 or raw.shape[0] != shortlist.indices.shape[0] or raw.shape[1] < k:
        raise ValueError(
            f"raw must be (Q, >= {k}) with Q = {shortlist.indices.shape[0]}, got {tuple(raw.shape)}"
        )
    present = ~shortlist.missing[:, :k].to(raw.device)
    raw = torch.where(present, raw[:, :k].float(), 0.0)
    check_finite_values(raw, "raw")
    fused = fuse(shortlist.scores[:, :k].float().to(raw.device), raw, lamb, temp)
    fused = fused.masked_fill(~present, float("-inf"))  # missing: behind every real entry
    order = fused.argsort(dim=1, descending=True, stable=True).to(
        shortlist.indices.device
    )  # ties: global order
    ranking = shortlist.indices.clone()
    ranking[:, :k] = shortlist.indices[:, :k].gather(1, order)
    return ranking


class TableScorer(SummaryRepr):
    """A :class:`~objretrieval.search.PairwiseScorer` reading a precomputed (Q, N) table of pairwise scores."""

    def __init__(self, scores: Any) -> None:
        table = to_tensor(scores, "scores")
        if table.ndim != 2 or not table.is_floating_point():
            raise ValueError(
                f"scores must be a (Q, N) floating table, got {table.dtype} {tuple(table.shape)}"
            )
        self.table = table
        self.device = table.device

    def summary_fields(self) -> dict[str, Any]:
        """What the repr shows: ``TableScorer(scores=Tensor(shape=(70, 5000), dtype=float32))``."""
        return {"scores": self.table}

    @property
    def num_queries(self) -> int:
        return int(self.table.shape[0])

    @property
    def num_gallery(self) -> int:
        return int(self.table.shape[1])

    def score_pairs(self, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
        query_ids, gallery_ids = check_pairs(self, query_ids, gallery_ids)
        return self.table[query_ids, gallery_ids].float()

    def score_block(self, query_rows: slice, gallery_rows: slice) -> Tensor:
        return self.table[query_rows, gallery_rows].float()


def score_table(scores: Any) -> TableScorer:
    """A scorer reading a precomputed (Q, N) table of pairwise scores (e.g. the official fixtures)."""
    return TableScorer(scores)
