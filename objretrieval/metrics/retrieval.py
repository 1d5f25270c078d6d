"""Per-query ranking metrics computed from :class:`~objretrieval.metrics.ranks.RelevantRanks`.

Every function returns a (Q,) float64 tensor with NaN for queries that have no relevant item in the gallery
(their score is undefined); :func:`reduce_queries` applies the policy for those when averaging.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from objretrieval.metrics.ranks import RelevantRanks

#: What to do with queries that have no relevant item: leave them out of the mean (PML and the revisited
#: protocol do this), count them as 0, or raise.
NoRelevantPolicy = Literal["exclude", "zero", "error"]


def _undefined_to_nan(values: Tensor, ranks: RelevantRanks) -> Tensor:
    return torch.where(ranks.num_relevant > 0, values, torch.full_like(values, float("nan")))


def _require_depth(ranks: RelevantRanks, needed: int, what: str) -> None:
    if ranks.depth is not None and ranks.depth < needed:
        raise ValueError(f"{what} needs rankings at least {needed} deep, but they stop at {ranks.depth}")


def _positions(ranks: RelevantRanks) -> Tensor:
    """(1, P) float64 1-based index of each relevant item among the relevant items: 1, 2, 3, ..."""
    return torch.arange(1, ranks.ranks.shape[1] + 1, dtype=torch.float64, device=ranks.ranks.device)[None]


def recall_at_k(ranks: RelevantRanks, k: int) -> Tensor:
    """1 where a relevant item is among the top ``k`` (the deep-metric-learning Recall@K), else 0."""
    _require_depth(ranks, k, f"recall@{k}")
    first = ranks.ranks[:, 0] if ranks.ranks.shape[1] else torch.zeros_like(ranks.num_relevant)
    hit = (first > 0) & (first <= k)
    return _undefined_to_nan(hit.double(), ranks)


def precision_at_1(ranks: RelevantRanks) -> Tensor:
    """1 where the top-ranked item is relevant."""
    return recall_at_k(ranks, 1)


def _within_r(ranks: RelevantRanks, what: str) -> Tensor:
    """(Q, P) bool: relevant item found at a rank <= R, the query's number of relevant items."""
    _require_depth(ranks, int(ranks.num_relevant.max()), what)
    return ranks.found & (ranks.ranks <= ranks.num_relevant[:, None])


def r_precision(ranks: RelevantRanks) -> Tensor:
    """Fraction of the top R items that are relevant, R = number of relevant items."""
    hits = _within_r(ranks, "R-precision").sum(dim=1).double()
    return _undefined_to_nan(hits / ranks.num_relevant.clamp(min=1), ranks)


def map_at_r(ranks: RelevantRanks) -> Tensor:
    """MAP@R (Musgrave et al. 2020): (1/R) sum over the top R of precision@i at each relevant position i."""
    within = _within_r(ranks, "MAP@R")
    precision = _positions(ranks) / ranks.ranks.clamp(min=1)
    ap = torch.where(within, precision, 0.0).sum(dim=1) / ranks.num_relevant.clamp(min=1)
    return _undefined_to_nan(ap, ranks)


def reciprocal_rank(ranks: RelevantRanks) -> Tensor:
    """1 / the rank of the first relevant item, 0 when none is found within the ranking's depth.

    Its mean is the mean reciprocal rank (MRR); over a ranking truncated at K, MRR@K.
    """
    first = ranks.ranks[:, 0] if ranks.ranks.shape[1] else torch.zeros_like(ranks.num_relevant)
    rr = torch.where(first > 0, 1.0 / first.clamp(min=1).double(), 0.0)
    return _undefined_to_nan(rr, ranks)


def _normaliser(ranks: RelevantRanks) -> Tensor:
    """min(R, depth): a truncated ranking can hold at most ``depth`` relevant items."""
    n = ranks.num_relevant
    if ranks.depth is not None:
        n = n.clamp(max=ranks.depth)
    return n.clamp(min=1).double()


def average_precision(ranks: RelevantRanks) -> Tensor:
    """Average precision, sum of precision at each relevant item / min(R, depth).

    Over a complete ranking (``depth=None``) this is the usual AP; over a ranking truncated at depth d it is
    AP@d as used for GLDv2 (mAP@100).
    """
    precision = _positions(ranks) / ranks.ranks.clamp(min=1)
    ap = torch.where(ranks.found, precision, 0.0).sum(dim=1) / _normaliser(ranks)
    return _undefined_to_nan(ap, ranks)


def trapezoidal_average_precision(ranks: RelevantRanks) -> Tensor:
    """AP as the area under the precision-recall curve by trapezoids (the revisited Oxford/Paris protocol).

    With r_j the 0-based rank of the j-th relevant item (j from 0), each item adds
    ``[(j / r_j, or 1 if r_j = 0) + (j + 1) / (r_j + 1)] / 2`` and the sum is divided by min(R, depth).
    """
    j = _positions(ranks) - 1
    r = (ranks.ranks - 1).double()
    before = torch.where(r > 0, j / r.clamp(min=1), 1.0)
    after = (j + 1) / (r + 1).clamp(min=1)
    ap = torch.where(ranks.found, (before + after) / 2, 0.0).sum(dim=1) / _normaliser(ranks)
    return _undefined_to_nan(ap, ranks)


def reduce_queries(
    values: Tensor, policy: NoRelevantPolicy = "exclude", name: str = "metric", classes: Tensor | None = None
) -> float:
    """Average per-query values, treating NaN (no relevant item) according to ``policy``.

    Args:
        values: (Q,) per-query values, NaN where undefined.
        policy: ``"exclude"`` leaves undefined queries out, ``"zero"`` counts them as 0, ``"error"`` raises.
        name: the metric's name, for the error message.
        classes: optional (Q,) int64 class index of each query: average within each class first, then over
            the classes (pytorch-metric-learning's ``avg_of_avgs``). Under ``"exclude"`` a class whose queries
            are all undefined is left out.
    """
    undefined = torch.isnan(values)
    if policy == "error" and bool(undefined.any()):
        raise ValueError(
            f"{int(undefined.sum())} queries have no relevant item in the gallery, so {name} is "
            "undefined for them (no_relevant='error')"
        )
    if policy == "zero":
        values, undefined = torch.nan_to_num(values, nan=0.0), torch.zeros_like(undefined)
    if bool(undefined.all()):
        return float("nan")
    values = values[~undefined]
    if classes is None:
        return float(values.mean())
    _, group = torch.unique(classes[~undefined], return_inverse=True)
    num_groups = int(group.max()) + 1
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    sizes = torch.bincount(group, minlength=num_groups).to(values.dtype)
    return float((sums / sizes).mean())
