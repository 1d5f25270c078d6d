"""One object that turns embeddings (or a ranking) and labels into every retrieval metric at once."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_embeddings, check_labels, check_ranking, to_tensor
from objretrieval.metrics import retrieval
from objretrieval.metrics.clustering import kmeans, normalized_mutual_info, pairwise_f1
from objretrieval.metrics.ranks import RelevantRanks, count_relevant, ranks_exhaustive, ranks_from_ranking
from objretrieval.metrics.retrieval import NoRelevantPolicy, reduce_queries
from objretrieval.metrics.set_retrieval import average_recall_at_k
from objretrieval.search import METRICS, Metric, knn
from objretrieval.search.pairwise import PairwiseScorer, pairwise_knn
from objretrieval.search.sources import BlockSource, GalleryLike

_NAME = re.compile(
    r"^(?:recall@(?P<recall>\d+)|map@(?P<map_k>\d+)|ar@(?P<ar>\d+)|precision@1|r_precision|map@r"
    r"|map|nmi|nmi_geometric|f1)$"
)
_CLUSTERING = ("nmi", "nmi_geometric", "f1")
_PER_QUERY: dict[str, Callable[[RelevantRanks], Tensor]] = {
    "precision@1": retrieval.precision_at_1,
    "r_precision": retrieval.r_precision,
    "map@r": retrieval.map_at_r,
    "map": retrieval.average_precision,
}


@dataclass(frozen=True)
class RetrievalResult:
    """Metric values (fractions in [0, 1]) and, on request, the per-query values behind them.

    Attributes:
        metrics: name -> mean over the evaluated queries.
        per_query: name -> (Q,) float64, NaN for queries without relevant items (empty unless requested).
        num_queries: number of queries.
        num_without_relevant: queries with no relevant gallery item (see ``no_relevant``).
    """

    metrics: dict[str, float]
    per_query: dict[str, Tensor] = field(default_factory=dict)
    num_queries: int = 0
    num_without_relevant: int = 0

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def __str__(self) -> str:
        width = max((len(n) for n in self.metrics), default=0)
        lines = [f"{name:<{width}}  {value:.4f}" for name, value in self.metrics.items()]
        lines.append(f"({self.num_queries} queries, {self.num_without_relevant} without relevant items)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Metric:
    name: str
    k: int | None  # the K of recall@K, map@K and ar@K


def _parse(names: Sequence[str]) -> list[_Metric]:
    parsed = []
    for name in names:
        m = _NAME.match(name)
        if m is None:
            raise ValueError(
                f"unknown metric {name!r}; expected recall@K, precision@1, r_precision, map@r, map, map@K, "
                "ar@K, nmi, nmi_geometric or f1"
            )
        k = next((int(v) for v in m.groupdict().values() if v is not None), None)
        if k is not None and k < 1:
            raise ValueError(f"{name!r}: K must be >= 1")
        parsed.append(_Metric(name, k))
    return parsed


class RetrievalEvaluator:
    """Evaluate retrieval on one set (leave-one-out) or a query set against a gallery.

    Metric names: ``recall@K`` (hit if any of the top K shares the query's label), ``precision@1``,
    ``r_precision``, ``map@r`` (MAP@R), ``map`` (AP over the full ranking), ``map@K`` (AP over the top K,
    normalised by min(R, K), as GLDv2's mAP@100), ``ar@K`` (MILE's average of Recall@1..K per query class),
    ``nmi`` and ``nmi_geometric`` (k-means with k = number of query classes; arithmetic / geometric
    normalisation) and ``f1`` (pairwise F-measure of that clustering).

    Ranking metrics run on an exact streamed kNN of just the depth they need (``map`` on an exhaustive
    streamed count), so memory stays O(Q x depth). Ties rank the lower gallery index first.

    Queries with no relevant gallery item (under leave-one-out, every sample of a single-sample class) have
    undefined scores. ``no_relevant="exclude"`` (the default, as PML and the revisited protocol) leaves them
    out of every mean, ``"zero"`` counts them as 0 (a Recall@K miss), ``"error"`` raises.
    :attr:`RetrievalResult.num_without_relevant` reports how many there were.

    Args:
        metrics: names to compute.
        metric: similarity for ranking: ``"cosine"``, ``"ip"`` or ``"l2"``.
        no_relevant: policy for queries without relevant items.
        return_per_query: fill :attr:`RetrievalResult.per_query`.
        backend: kNN backend, ``"torch"`` or ``"faiss"`` (see :func:`objretrieval.search.knn`).
        block_size: gallery rows per block.
        device: where to search; default the queries' device.
        progress: show progress bars.
        kmeans_seed: seed of the clustering metrics' k-means.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("precision@1", "r_precision", "map@r"),
        *,
        metric: Metric = "cosine",
        no_relevant: NoRelevantPolicy = "exclude",
        return_per_query: bool = False,
        backend: str = "torch",
        block_size: int = 4096,
        device: torch.device | str | None = None,
        progress: bool = False,
        kmeans_seed: int = 1234,
    ) -> None:
        self.metrics = _parse((metrics,) if isinstance(metrics, str) else metrics)
        self.metric: Metric = check_choice(metric, "metric", METRICS)
        self.no_relevant: NoRelevantPolicy = check_choice(
            no_relevant, "no_relevant", ("exclude", "zero", "error")
        )
        self.return_per_query = return_per_query
        self.backend = check_choice(backend, "backend", ("torch", "faiss"))
        self.block_size = block_size
        self.device = device
        self.progress = progress
        self.kmeans_seed = kmeans_seed

    def __call__(
        self, queries: Any, query_labels: Any, gallery: GalleryLike | None = None, gallery_labels: Any = None
    ) -> RetrievalResult:
        """Evaluate embeddings.

        Args:
            queries: (Q, D) query embeddings.
            query_labels: (Q,) integer labels.
            gallery: (N, D) gallery embeddings (any source :func:`~objretrieval.search.knn` takes), or None to
                evaluate the queries against each other, each query's own row excluded.
            gallery_labels: (N,) integer labels; required with ``gallery``, forbidden without.
        """
        q = check_embeddings(queries, "queries")
        ql = check_labels(query_labels, "query_labels", q.shape[0], "queries")
        source = None if gallery is None else BlockSource(gallery, "gallery", self.block_size)
        gl, exclude = self._gallery_labels(ql, source, gallery_labels)
        num_relevant = count_relevant(ql, gl, exclude)
        device = torch.device(self.device) if self.device is not None else q.device
        names = {m.name for m in self.metrics}

        ranks = None
        if "map" in names:
            ranks = ranks_exhaustive(
                q,
                ql,
                source if source is not None else q,
                gl,
                metric=self.metric,
                exclude=exclude,
                device=device,
                block_size=self.block_size,
                progress=self.progress,
            )
        scores = indices = None
        depth = self._knn_depth(num_relevant, exhaustive=ranks is not None)
        if depth:
            scores, indices = knn(
                q,
                source,
                k=depth,
                metric=self.metric,
                backend=self.backend,
                block_size=self.block_size,
                device=device,
                progress=self.progress,
            )
            scores, indices = scores.cpu(), indices.cpu()
            if ranks is None:
                ranks = ranks_from_ranking(indices, ql, gl, num_relevant)
        clustering = None
        if names & set(_CLUSTERING):
            if source is None:
                clustering = (q, ql)
            else:
                clustering = (torch.cat([q.float(), _materialise(source)]), torch.cat([ql, gl]))
        if source is not None and source.num_rows != gl.shape[0]:  # iterables reveal their length only now
            raise ValueError(
                f"gallery_labels has {gl.shape[0]} entries but the gallery has {source.num_rows} rows"
            )
        return self._finish(ranks, scores, indices, ql, gl, num_relevant, clustering)

    def from_ranking(
        self, ranking: Any, query_labels: Any, gallery_labels: Any = None, *, scores: Any = None
    ) -> RetrievalResult:
        """Evaluate a precomputed ranking.

        Args:
            ranking: (Q, K) gallery ids, best first; -1 marks an empty slot. Metrics needing more depth than K
                raise. With ``gallery_labels=None`` the gallery is the query set, and no row may list its own
                query.
            query_labels: (Q,) integer labels.
            gallery_labels: (N,) integer labels, or None for leave-one-out on the queries.
            scores: (Q, K) scores along the ranking; needed only for ``ar@K`` with several queries per class.
        """
        if any(m.name in _CLUSTERING for m in self.metrics):
            raise ValueError("nmi, nmi_geometric and f1 cluster the embeddings: call the evaluator on them")
        r = check_ranking(ranking, "ranking")
        ql = check_labels(query_labels, "query_labels", r.shape[0], "ranking")
        if gallery_labels is None:
            gl, exclude = ql, torch.arange(ql.shape[0])
        else:
            gl, exclude = check_labels(gallery_labels, "gallery_labels"), None
        _check_ranking_ids(r, gl.shape[0], exclude)
        num_relevant = count_relevant(ql, gl, exclude)
        ranks = ranks_from_ranking(r, ql, gl, num_relevant)
        s = None if scores is None else to_tensor(scores, "scores")
        return self._finish(ranks, s, r, ql, gl, num_relevant, None)

    def from_scorer(
        self,
        scorer: PairwiseScorer,
        query_labels: Any,
        gallery_labels: Any = None,
        *,
        candidates: Tensor | None = None,
        query_block_size: int = 32,
        gallery_block_size: int = 32,
    ) -> RetrievalResult:
        """Evaluate a pairwise scorer (e.g. :class:`~objretrieval.models.AVSLScorer`), streamed in blocks.

        The ranking comes from :func:`~objretrieval.search.pairwise_knn` to the depth the metrics need, so
        memory is O(Q x depth) plus one block (``map`` ranks the whole gallery: O(Q x N)). Clustering metrics
        need embeddings and are refused.

        Args:
            scorer: scores queries against gallery items, higher is better.
            query_labels: (Q,) integer labels.
            gallery_labels: (N,) labels, or None when the gallery is the query set (leave-one-out, self
                excluded).
            candidates: optional (Q, S) shortlist of gallery ids to rescore instead of ranking the whole gallery
                (:func:`~objretrieval.search.pairwise_knn`); metrics then see only the shortlist.
            query_block_size: queries per block of the exhaustive walk.
            gallery_block_size: gallery items per block.
        """
        if any(m.name in _CLUSTERING for m in self.metrics):
            raise ValueError("nmi, nmi_geometric and f1 cluster embeddings: a pairwise scorer has none")
        ql = check_labels(query_labels, "query_labels", scorer.num_queries, "scorer queries")
        leave_one_out = gallery_labels is None
        if leave_one_out:
            if scorer.num_gallery != scorer.num_queries:
                raise ValueError(
                    f"gallery_labels is required: the scorer's gallery has {scorer.num_gallery} items "
                    f"and its queries {scorer.num_queries}"
                )
            gl, exclude = ql, torch.arange(ql.shape[0])
        else:
            gl, exclude = (
                check_labels(gallery_labels, "gallery_labels", scorer.num_gallery, "scorer gallery"),
                None,
            )
        num_relevant = count_relevant(ql, gl, exclude)
        available = scorer.num_gallery - int(leave_one_out)
        if any(m.name == "map" for m in self.metrics):
            depth = available
        else:
            depth = self._knn_depth(num_relevant, exhaustive=False)
        if candidates is None:
            depth = min(depth, available)
        found = pairwise_knn(
            scorer,
            depth,
            exclude_self=leave_one_out,
            candidates=candidates,
            query_block_size=query_block_size,
            gallery_block_size=gallery_block_size,
            progress=self.progress,
        )
        scores, indices = found.scores.cpu(), found.indices.cpu()
        ranks = ranks_from_ranking(indices, ql, gl, num_relevant)
        if candidates is None and depth == available:
            ranks = RelevantRanks(ranks.ranks, ranks.num_relevant, None)  # the whole gallery was ranked
        return self._finish(ranks, scores, indices, ql, gl, num_relevant, None, higher_is_better=True)

    def _gallery_labels(
        self, ql: Tensor, source: BlockSource | None, gallery_labels: Any
    ) -> tuple[Tensor, Tensor | None]:
        """Gallery labels and the per-query excluded gallery index (leave-one-out excludes the query)."""
        if source is None:
            if gallery_labels is not None:
                raise ValueError(
                    "gallery_labels given without a gallery: pass both, or neither for leave-one-out"
                )
            return ql, torch.arange(ql.shape[0])
        if gallery_labels is None:
            raise ValueError("gallery given without gallery_labels")
        return check_labels(gallery_labels, "gallery_labels", source.num_rows, "gallery"), None

    def _knn_depth(self, num_relevant: Tensor, exhaustive: bool) -> int:
        """Neighbours the requested metrics need from a kNN search (0: no search needed)."""
        depth = 0
        for m in self.metrics:
            if m.name.startswith("ar@"):  # needs the neighbours' scores, which exhaustive ranks lack
                depth = max(depth, m.k or 0)
            elif exhaustive or m.name in _CLUSTERING:
                continue
            elif m.name in ("r_precision", "map@r"):
                depth = max(depth, int(num_relevant.max()), 1)
            else:
                depth = max(depth, m.k or 1)
        return depth

    def _finish(
        self,
        ranks: RelevantRanks | None,
        scores: Tensor | None,
        indices: Tensor | None,
        ql: Tensor,
        gl: Tensor,
        num_relevant: Tensor,
        clustering: tuple[Tensor, Tensor] | None,
        higher_is_better: bool | None = None,
    ) -> RetrievalResult:
        values: dict[str, float] = {}
        per_query: dict[str, Tensor] = {}
        assignment = None
        for m in self.metrics:
            if m.name in _CLUSTERING:
                assert clustering is not None
                embeddings, labels = clustering
                if assignment is None:
                    assignment, _ = kmeans(embeddings, int(torch.unique(ql).numel()), seed=self.kmeans_seed)
                values[m.name] = _clustering_score(m.name)(assignment, labels)
            elif m.name.startswith("ar@"):
                assert indices is not None and m.k is not None
                if indices.shape[1] < m.k:
                    raise ValueError(f"{m.name} needs rankings at least {m.k} deep, got {indices.shape[1]}")
                s = None if scores is None else scores[:, : m.k]
                values[m.name] = average_recall_at_k(
                    s,
                    indices[:, : m.k],
                    ql,
                    gl,
                    higher_is_better=self.metric != "l2" if higher_is_better is None else higher_is_better,
                ).mean
            else:
                assert ranks is not None
                v = _per_query(m, ranks)
                values[m.name] = reduce_queries(v, self.no_relevant, m.name)
                if self.return_per_query:
                    per_query[m.name] = v
        return RetrievalResult(values, per_query, int(ql.shape[0]), int((num_relevant == 0).sum()))


def _per_query(m: _Metric, ranks: RelevantRanks) -> Tensor:
    if m.name.startswith("recall@"):
        assert m.k is not None
        return retrieval.recall_at_k(ranks, m.k)
    if m.name.startswith("map@") and m.k is not None:
        return retrieval.average_precision(ranks.truncate(m.k))
    return _PER_QUERY[m.name](ranks)


def _clustering_score(name: str) -> Callable[[Tensor, Tensor], float]:
    if name == "f1":
        return pairwise_f1
    average = "geometric" if name == "nmi_geometric" else "arithmetic"
    return lambda pred, labels: normalized_mutual_info(pred, labels, average)  # type: ignore[arg-type]


def _materialise(source: BlockSource) -> Tensor:
    if not source.reiterable:
        raise ValueError("clustering metrics read the gallery again: pass an array, not a one-shot generator")
    return torch.cat([block.float() for _, block in source.blocks()], dim=0)


def _check_ranking_ids(ranking: Tensor, num_gallery: int, exclude: Tensor | None) -> None:
    if ranking.numel() == 0:
        raise ValueError("ranking is empty")
    lo, hi = int(ranking.min()), int(ranking.max())
    if lo < -1 or hi >= num_gallery:
        raise ValueError(f"ranking holds ids outside [-1, {num_gallery}): min {lo}, max {hi}")
    ordered = ranking.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        q = int(repeated.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"ranking row {q} lists a gallery id more than once")
    if exclude is not None:
        has_self = (ranking == exclude[:, None]).any(dim=1)
        if bool(has_self.any()):
            q = int(has_self.nonzero()[0, 0])
            raise ValueError(
                f"ranking row {q} contains query {q} itself; leave-one-out rankings must exclude it"
            )
