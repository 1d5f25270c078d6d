"""The metric table: one :class:`MetricSpec` row per metric name the :class:`RetrievalEvaluator` accepts.

A row says how the metric is computed (its function), what that function needs (the relevant items' ranks, the
neighbour lists with their scores, or a clustering of the embeddings) and how deep the search must go. The
evaluator reads only this table, so a metric registered with :func:`register_metric` is computed like a built-in
one, from the same search.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from objretrieval._validation import check_choice
from objretrieval.metrics import retrieval
from objretrieval.metrics.clustering import adjusted_mutual_info, normalized_mutual_info, pairwise_f1
from objretrieval.metrics.ranks import RelevantRanks
from objretrieval.metrics.set_retrieval import average_recall_at_k

#: What a metric's function is computed from.
Needs = Literal["ranks", "neighbors", "clustering"]
#: How deep the ranking must go: the K of the name, R (the query's number of relevant items), the whole
#: gallery, or a fixed depth.
Depth = Literal["k", "r", "all"] | int

_NAME = re.compile(r"^[a-z][a-z0-9_]*(@([0-9]+|[a-z]+|K))?$")
_WITH_K = re.compile(r"^(?P<base>.+)@(?P<k>[0-9]+)$")


@dataclass(frozen=True)
class NeighborLists:
    """What a ``"neighbors"`` metric sees: each query's ranked gallery ids with their scores.

    Attributes:
        scores: (Q, K) scores along each ranking, distances when ``higher_is_better`` is False; None for a
            ranking given without scores (:meth:`RetrievalEvaluator.from_ranking`).
        indices: (Q, K) int64 gallery ids, best first; -1 marks an empty slot.
        query_labels: (Q,) int64.
        gallery_labels: (N,) int64.
        higher_is_better: whether ``scores`` are similarities.
    """

    scores: Tensor | None
    indices: Tensor
    query_labels: Tensor
    gallery_labels: Tensor
    higher_is_better: bool

    def truncate(self, depth: int) -> NeighborLists:
        """The first ``depth`` columns."""
        if self.indices.shape[1] < depth:
            raise ValueError(f"needs rankings at least {depth} deep, got {self.indices.shape[1]}")
        s = None if self.scores is None else self.scores[:, :depth]
        return NeighborLists(
            s, self.indices[:, :depth], self.query_labels, self.gallery_labels, self.higher_is_better
        )


@dataclass(frozen=True)
class MetricSpec:
    """One row of the metric table.

    Attributes:
        name: the metric's name (``"precision@1"``), or a pattern ending in ``@K`` (``"recall@K"``) that
            matches ``recall@1``, ``recall@2``, ...; the K is then passed to ``fn`` as its second argument.
        fn: computes the metric from what ``needs`` names:

            - ``"ranks"``: ``fn(ranks[, k]) -> (Q,) float64`` per-query values from
              :class:`~objretrieval.metrics.RelevantRanks`, NaN for queries without relevant items; the
              evaluator averages them (``no_relevant``, ``average``) and returns them per query on request.
            - ``"neighbors"``: ``fn(neighbors[, k]) -> float`` from :class:`NeighborLists` cut at the depth.
            - ``"clustering"``: ``fn(assignment, labels) -> float`` from the k-means assignment of the
              embeddings (k = number of query classes) and their labels.
        needs: ``"ranks"``, ``"neighbors"`` or ``"clustering"``.
        depth: how deep the search must go: ``"k"`` (the K of the name), ``"r"`` (each query's number of
            relevant items; the search goes as deep as the largest), ``"all"`` (the whole gallery: an exact
            streamed count of every relevant item's rank) or a fixed int. Ignored for clustering.
        description: one line for the docs and error messages.
    """

    name: str
    fn: Callable[..., Any]
    needs: Needs = "ranks"
    depth: Depth = "k"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"name must be lower-case letters, digits and '_', optionally ending in '@K' or '@<digits>', "
                f"got {self.name!r}"
            )
        if not callable(self.fn):
            raise TypeError(f"fn must be callable, got {type(self.fn).__name__}")
        check_choice(self.needs, "needs", Needs)
        if isinstance(self.depth, bool) or not (
            self.depth in ("k", "r", "all") or (isinstance(self.depth, int) and self.depth >= 1)
        ):
            raise ValueError(f"depth must be 'k', 'r', 'all' or an int >= 1, got {self.depth!r}")
        if self.needs == "neighbors" and self.depth == "all":
            raise ValueError(f"{self.name!r}: neighbour lists need a finite depth ('k', 'r' or an int)")
        if self.depth == "k" and self.needs != "clustering" and not self.takes_k:
            raise ValueError(f"{self.name!r}: depth='k' needs a name ending in '@K'")

    @property
    def takes_k(self) -> bool:
        return self.name.endswith("@K")


@dataclass(frozen=True)
class Request:
    """A metric name as requested, resolved to its table row (and K)."""

    name: str
    spec: MetricSpec
    k: int | None

    def depth(self, max_relevant: int) -> int | None:
        """Ranking depth this metric needs; None for the whole gallery."""
        d = self.spec.depth
        if d == "all":
            return None
        if d == "k":
            assert self.k is not None
            return self.k
        if d == "r":
            return max(max_relevant, 1)
        return int(d)

    def per_query(self, ranks: RelevantRanks) -> Tensor:
        values = self.spec.fn(ranks, self.k) if self.spec.takes_k else self.spec.fn(ranks)
        if not isinstance(values, Tensor) or tuple(values.shape) != (ranks.num_queries,):
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise TypeError(
                f"{self.name} must give one value per query, shape ({ranks.num_queries},); got {got}"
            )
        return values.double()

    def neighbors(self, found: NeighborLists) -> float:
        return float(self.spec.fn(found, self.k) if self.spec.takes_k else self.spec.fn(found))


_TABLE: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec, *, replace: bool = False) -> MetricSpec:
    """Add a row to the metric table, so every :class:`RetrievalEvaluator` accepts its name.

    Args:
        spec: the row.
        replace: allow replacing an existing row of the same name (refused otherwise, so that a typo cannot
            silently change a built-in metric).

    Returns:
        ``spec``, so the call can be used as a one-liner.
    """
    if not isinstance(spec, MetricSpec):
        raise TypeError(f"spec must be a MetricSpec, got {type(spec).__name__}")
    if spec.name in _TABLE and not replace:
        raise ValueError(f"metric {spec.name!r} is already registered; pass replace=True to replace it")
    _TABLE[spec.name] = spec
    return spec


def list_metrics() -> list[MetricSpec]:
    """The rows of the metric table, in registration order."""
    return list(_TABLE.values())


def resolve(name: str) -> Request:
    """The table row of a requested name: an exact row, else a ``name@K`` pattern with K >= 1."""
    if not isinstance(name, str):
        raise TypeError(f"metric names must be strings, got {type(name).__name__}")
    if name in _TABLE and not name.endswith("@K"):
        return Request(name, _TABLE[name], None)
    m = _WITH_K.match(name)
    if m is not None and f"{m['base']}@K" in _TABLE:
        k = int(m["k"])
        if k < 1:
            raise ValueError(f"{name!r}: K must be >= 1")
        return Request(name, _TABLE[f"{m['base']}@K"], k)
    known = ", ".join(s.name for s in _TABLE.values())
    raise ValueError(f"unknown metric {name!r}; expected one of {known} (K a positive integer)")


def _map_at_k(ranks: RelevantRanks, k: int) -> Tensor:
    return retrieval.average_precision(ranks.truncate(k))


def _mrr_at_k(ranks: RelevantRanks, k: int) -> Tensor:
    return retrieval.reciprocal_rank(ranks.truncate(k))


def _ar_at_k(found: NeighborLists, k: int) -> float:
    """AR@K of neighbour lists already cut at K."""
    return average_recall_at_k(
        found.scores,
        found.indices,
        found.query_labels,
        found.gallery_labels,
        higher_is_better=found.higher_is_better,
    ).mean


def _nmi(assignment: Tensor, labels: Tensor) -> float:
    return normalized_mutual_info(assignment, labels, "arithmetic")


def _nmi_geometric(assignment: Tensor, labels: Tensor) -> float:
    return normalized_mutual_info(assignment, labels, "geometric")


for _spec in (
    MetricSpec(
        "recall@K", retrieval.recall_at_k, "ranks", "k", "1 if any of the top K is relevant (DML Recall@K)"
    ),
    MetricSpec("precision@1", retrieval.precision_at_1, "ranks", 1, "1 if the top item is relevant"),
    MetricSpec("r_precision", retrieval.r_precision, "ranks", "r", "fraction relevant among the top R"),
    MetricSpec("map@r", retrieval.map_at_r, "ranks", "r", "MAP@R (Musgrave et al. 2020)"),
    MetricSpec("map", retrieval.average_precision, "ranks", "all", "AP over the whole ranking"),
    MetricSpec("map@K", _map_at_k, "ranks", "k", "AP over the top K, normalised by min(R, K) (GLDv2)"),
    MetricSpec("mrr", retrieval.reciprocal_rank, "ranks", "all", "1 / rank of the first relevant item"),
    MetricSpec("mrr@K", _mrr_at_k, "ranks", "k", "1 / rank of the first relevant item in the top K, else 0"),
    MetricSpec("ar@K", _ar_at_k, "neighbors", "k", "MILE's AR@K, per query class"),
    MetricSpec("nmi", _nmi, "clustering", "all", "NMI of k-means, arithmetic normalisation"),
    MetricSpec(
        "nmi_geometric", _nmi_geometric, "clustering", "all", "NMI of k-means, geometric normalisation"
    ),
    MetricSpec("ami", adjusted_mutual_info, "clustering", "all", "adjusted mutual information of k-means"),
    MetricSpec("f1", pairwise_f1, "clustering", "all", "pairwise F-measure of k-means (MIC)"),
):
    register_metric(_spec)
