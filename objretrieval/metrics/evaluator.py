"""One object that turns embeddings (or a ranking, or a pairwise scorer) and labels into every metric at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from objretrieval._validation import (
    check_choice,
    check_embeddings,
    check_label_rows,
    check_labels,
    check_positive_int,
    check_ranking,
    to_tensor,
)
from objretrieval.display import ConfigRepr, SummaryRepr, retrieval_result_html
from objretrieval.distributed.world import Group
from objretrieval.metrics.clustering import kmeans
from objretrieval.metrics.ranks import (
    LabelComparison,
    Relevance,
    RelevantRanks,
    already_checked,
    ranks_exhaustive,
    ranks_from_ranking,
)
from objretrieval.metrics.registry import NeighborLists, Request, resolve
from objretrieval.metrics.retrieval import NoRelevantPolicy, reduce_queries
from objretrieval.progress import show_progress
from objretrieval.search import METRICS, Backend, FaissOptions, Metric, knn
from objretrieval.search.exact import PRECISIONS, Precision, SearchStats
from objretrieval.search.faiss_backend import resolve_faiss_options
from objretrieval.search.pairwise import PairwiseScorer, pairwise_knn
from objretrieval.search.sources import BlockSource, GalleryLike

#: How per-query values become one number: the mean over queries, or the mean over query classes of the
#: per-class means (pytorch-metric-learning's ``avg_of_avgs``).
Average = Literal["query", "class"]


@dataclass(frozen=True, repr=False)  # per-query tensors print as their shapes (SummaryRepr)
class RetrievalResult(SummaryRepr):
    """Metric values (fractions in [0, 1]) and, on request, the per-query values behind them.

    Attributes:
        metrics: name -> mean over the evaluated queries.
        per_query: name -> (Q,) float64, NaN for queries without relevant items (empty unless requested).
        num_queries: number of queries.
        num_without_relevant: queries with no relevant gallery item (see ``no_relevant``).
        search: what the exact searches did (:class:`~objretrieval.search.exact.SearchStats`), the kNN search
            and, for ``map`` / ``mrr``, the exhaustive rank count added together: each adds its Q query rows
            to ``queries`` and its Q x N pairs to ``screened`` (under leave-one-out N = Q, each query's own
            pair included); ``rescored`` adds the kNN's exact scores and the count's exact scores of pairs
            near a relevant item's score (the relevant items' own are not counted). Under
            ``torch.distributed`` (:class:`~objretrieval.metrics.RetrievalMetrics`), this rank's share: summed
            over the ranks, ``queries`` and ``screened`` are one process's. None when no search of ours ran
            (a faiss kNN is not counted).
    """

    metrics: dict[str, float]
    per_query: dict[str, Tensor] = field(default_factory=dict)
    num_queries: int = 0
    num_without_relevant: int = 0
    search: SearchStats | None = None

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def __str__(self) -> str:
        width = max((len(n) for n in self.metrics), default=0)
        lines = [f"{name:<{width}}  {value:.4f}" for name, value in self.metrics.items()]
        lines.append(f"({self.num_queries} queries, {self.num_without_relevant} without relevant items)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The metric table Jupyter shows (see :func:`objretrieval.display.retrieval_result_html`)."""
        return retrieval_result_html(self)


class RetrievalEvaluator(ConfigRepr):
    """Evaluate retrieval on one set (leave-one-out), a query set against a gallery, a ranking or a scorer.

    Metric names are the rows of the metric table (:func:`~objretrieval.metrics.list_metrics`; add one with
    :func:`~objretrieval.metrics.register_metric`): ``recall@K`` (hit if any of the top K is relevant),
    ``precision@1``, ``r_precision``, ``map@r`` (MAP@R), ``map`` (AP over the full ranking), ``map@K`` (AP over
    the top K, normalised by min(R, K), as GLDv2's mAP@100), ``mrr`` / ``mrr@K`` (mean reciprocal rank of the
    first relevant item), ``ar@K`` (MILE's average of Recall@1..K per query class), ``nmi``,
    ``nmi_geometric`` and ``ami`` (k-means with k = number of query classes; arithmetic / geometric NMI,
    adjusted MI) and ``f1`` (pairwise F-measure of that clustering).

    Ranking metrics run on an exact streamed kNN of just the depth they need (``map`` and ``mrr`` on an
    exhaustive streamed count), so memory stays O(Q x depth). Ties rank the lower gallery index first.

    Queries with no relevant gallery item (under leave-one-out, every sample of a single-sample class) have
    undefined scores. ``no_relevant="exclude"`` (the default, as PML and the revisited protocol) leaves them
    out of every mean, ``"zero"`` counts them as 0 (a Recall@K miss), ``"error"`` raises.
    :attr:`RetrievalResult.num_without_relevant` reports how many there were.

    Args:
        metrics: names to compute (at least one).
        metric: similarity for ranking: ``"cosine"``, ``"ip"`` or ``"l2"``.
        no_relevant: policy for queries without relevant items.
        average: ``"query"`` (mean over queries) or ``"class"`` (mean over query classes of the per-class
            means, PML's ``avg_of_avgs``) for the ranking metrics.
        label_comparison_fn: custom relevance, PML's ``label_comparison_fn(query_labels, gallery_labels)``:
            the two arguments broadcast, e.g. (q, 1, *) against (1, g, *), and it returns their (q, g) bool
            relevance. Labels may then be (N, L), e.g. hierarchical levels. Ranking metrics only.
        return_per_query: fill :attr:`RetrievalResult.per_query`.
        backend: kNN backend, ``"torch"``, ``"triton"`` (the fused kernel, same results) or ``"faiss"`` (see
            :func:`objretrieval.search.knn`).
        faiss: :class:`~objretrieval.search.FaissOptions` of the faiss backend (only with ``backend="faiss"``;
            default an exact flat index).
        block_size: gallery rows per block.
        device: where to search; default the queries' device.
        progress: show progress bars; None (the default): only for long searches
            (:func:`objretrieval.progress.show_progress`).
        kmeans_seed: seed of the clustering metrics' k-means.
        precision: screening products of the torch kNN: ``"float32"`` or ``"bf16-exact"`` (bfloat16 products,
            then exact scores for every pair that can still enter a top-k: identical values, faster on CPUs
            with AVX-512 BF16 / AMX and on GPUs; see :func:`~objretrieval.search.knn`), also for the exhaustive
            count behind ``map`` and ``mrr``, which ranks by the same exact scores.
    """

    #: the repr shows the metric names as asked for, not their resolved table rows
    config_attributes: ClassVar[dict[str, str | None]] = {"metrics": "metric_names"}

    def __init__(
        self,
        metrics: Sequence[str] = ("precision@1", "r_precision", "map@r"),
        *,
        metric: Metric = "cosine",
        no_relevant: NoRelevantPolicy = "exclude",
        average: Average = "query",
        label_comparison_fn: LabelComparison | None = None,
        return_per_query: bool = False,
        backend: Backend = "torch",
        faiss: FaissOptions | None = None,
        block_size: int = 4096,
        device: torch.device | str | None = None,
        progress: bool | None = None,
        kmeans_seed: int = 1234,
        precision: Precision = "float32",
    ) -> None:
        names = [metrics] if isinstance(metrics, str) else list(metrics)
        if not names:
            raise ValueError("metrics is empty: name at least one metric, e.g. ['recall@1', 'map@r']")
        self.metrics: list[Request] = [resolve(name) for name in names]
        self.metric: Metric = check_choice(metric, "metric", METRICS)
        self.no_relevant: NoRelevantPolicy = check_choice(no_relevant, "no_relevant", NoRelevantPolicy)
        self.average: Average = check_choice(average, "average", Average)
        if label_comparison_fn is not None:
            if not callable(label_comparison_fn):
                raise TypeError(
                    f"label_comparison_fn must be callable, got {type(label_comparison_fn).__name__}"
                )
            by_equality = [r.name for r in self.metrics if r.spec.needs != "ranks"]
            if by_equality:
                raise ValueError(
                    f"label_comparison_fn applies to ranking metrics; {by_equality} compare labels by equality"
                )
        self.label_comparison_fn = label_comparison_fn
        self.return_per_query = return_per_query
        self.backend: Backend = check_choice(backend, "backend", Backend)
        self.faiss = resolve_faiss_options(self.backend, faiss)
        self.block_size = check_positive_int(block_size, "block_size")
        self.device = None if device is None else torch.device(device)
        self.progress = progress
        self.kmeans_seed = check_positive_int(kmeans_seed, "kmeans_seed", minimum=0)
        self.precision: Precision = check_choice(precision, "precision", PRECISIONS)
        if self.precision != "float32" and self.backend == "faiss":
            raise ValueError(
                f"precision={precision!r} is an option of our own search, not of the faiss backend"
            )

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names of the metrics computed, as given."""
        return tuple(request.name for request in self.metrics)

    def __call__(
        self, queries: Any, query_labels: Any, gallery: GalleryLike | None = None, gallery_labels: Any = None
    ) -> RetrievalResult:
        """Evaluate embeddings.

        Args:
            queries: (Q, D) query embeddings.
            query_labels: (Q,) integer labels ((Q, L) with a ``label_comparison_fn``).
            gallery: (N, D) gallery embeddings (any source :func:`~objretrieval.search.knn` takes), or None to
                evaluate the queries against each other, each query's own row excluded.
            gallery_labels: (N,) integer labels; required with ``gallery``, forbidden without.
        """
        q = check_embeddings(queries, "queries")
        if gallery is None and gallery_labels is not None:
            raise ValueError(
                "gallery_labels given without a gallery: pass both, or neither for leave-one-out"
            )
        if gallery is not None and gallery_labels is None:
            raise ValueError("gallery given without gallery_labels")
        source = None if gallery is None else BlockSource(gallery, "gallery", self.block_size)
        relevance = self._relevance(
            query_labels, gallery_labels, q.shape[0], "queries", None if source is None else source.num_rows
        )
        num_relevant = relevance.count()
        device = self.device if self.device is not None else q.device
        stats = SearchStats()
        ranks, found = self._search(q, source, relevance, num_relevant, device, stats)
        clustering = None
        if any(r.spec.needs == "clustering" for r in self.metrics):
            if source is None:
                clustering = (q, relevance.query_labels)
            else:
                embeddings = torch.cat([q.float(), _materialise(source)])
                clustering = (embeddings, torch.cat([relevance.query_labels, relevance.gallery_labels]))
        num_gallery = relevance.gallery_labels.shape[0]
        if source is not None and source.num_rows != num_gallery:  # iterables reveal their length only now
            raise ValueError(
                f"gallery_labels has {num_gallery} entries but the gallery has {source.num_rows} rows"
            )
        result = self._finish(ranks, found, relevance, num_relevant, clustering)
        return dataclasses.replace(result, search=stats) if stats.queries else result

    def from_ranking(
        self, ranking: Any, query_labels: Any, gallery_labels: Any = None, *, scores: Any = None
    ) -> RetrievalResult:
        """Evaluate a precomputed ranking.

        Args:
            ranking: (Q, K) gallery ids, best first; -1 marks an empty slot. Metrics needing more depth than K
                raise (``map`` and ``mrr`` need every gallery item ranked). With ``gallery_labels=None`` the
                gallery is the query set, and no row may list its own query.
            query_labels: (Q,) integer labels.
            gallery_labels: (N,) integer labels, or None for leave-one-out on the queries.
            scores: (Q, K) scores along the ranking; needed only for ``ar@K`` with several queries per class.
        """
        self._refuse_clustering("cluster the embeddings: call the evaluator on them")
        r = check_ranking(ranking, "ranking")
        relevance = self._relevance(query_labels, gallery_labels, r.shape[0], "ranking", None)
        num_gallery = relevance.gallery_labels.shape[0]
        _check_ranking_ids(r, num_gallery, relevance.exclude)
        num_relevant = relevance.count()
        ranks = self._ranks_of(r, relevance, num_relevant)
        whole = r.shape[1] >= _available(relevance) and bool((r >= 0).all())
        s = None if scores is None else to_tensor(scores, "scores")
        found = NeighborLists(s, r, relevance.query_labels, relevance.gallery_labels, self.metric != "l2")
        return self._finish(ranks, found, relevance, num_relevant, None, whole=whole)

    def from_scorer(
        self,
        scorer: PairwiseScorer,
        query_labels: Any,
        gallery_labels: Any = None,
        *,
        candidates: Tensor | None = None,
        query_block_size: int = 32,
        gallery_block_size: int = 32,
        group: Group | None = None,
    ) -> RetrievalResult:
        """Evaluate a pairwise scorer (any :class:`~objretrieval.search.PairwiseScorer`), streamed in blocks.

        The ranking comes from :func:`~objretrieval.search.pairwise_knn` to the depth the metrics need, so
        memory is O(Q x depth) plus one block (``map`` and ``mrr`` rank the whole gallery: O(Q x N)).
        Clustering metrics need embeddings and are refused.

        Args:
            scorer: scores queries against gallery items, higher is better.
            query_labels: (Q,) integer labels.
            gallery_labels: (N,) labels, or None when the gallery is the query set (leave-one-out, self
                excluded).
            candidates: optional (Q, S) shortlist of gallery ids to rescore instead of ranking the whole gallery
                (:func:`~objretrieval.search.pairwise_knn`); metrics then see only the shortlist, items outside
                it ranked last.
            query_block_size: queries per block of the exhaustive walk.
            gallery_block_size: gallery items per block.
            group: share the scoring over this process group's ranks (``pairwise_knn(..., group=)``); every
                rank gets the same result as one process. None: this process scores everything.
        """
        self._refuse_clustering("cluster embeddings: a pairwise scorer has none")
        if not isinstance(scorer, PairwiseScorer):
            raise TypeError(
                f"scorer must follow the objretrieval.search.PairwiseScorer protocol, got {type(scorer).__name__}"
            )
        leave_one_out = gallery_labels is None
        if leave_one_out and scorer.num_gallery != scorer.num_queries:
            raise ValueError(
                f"gallery_labels is required: the scorer's gallery has {scorer.num_gallery} items "
                f"and its queries {scorer.num_queries}"
            )
        relevance = self._relevance(
            query_labels, gallery_labels, scorer.num_queries, "scorer queries", scorer.num_gallery
        )
        num_relevant = relevance.count()
        available = _available(relevance)
        depth = self._depth(num_relevant)
        depth = available if depth is None else max(depth, 1)
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
            group=group,
        )
        scores, indices = found.scores.cpu(), found.indices.cpu()
        ranks = self._ranks_of(indices, relevance, num_relevant)
        neighbors = NeighborLists(scores, indices, relevance.query_labels, relevance.gallery_labels, True)
        # Every gallery item has a slot when depth >= available (with candidates: shortlisted ones ranked, the
        # rest last), so the metrics over the whole ranking apply.
        return self._finish(ranks, neighbors, relevance, num_relevant, None, whole=depth >= available)

    def _relevance(
        self,
        query_labels: Any,
        gallery_labels: Any,
        num_queries: int,
        queries_what: str,
        num_gallery: int | None,
    ) -> Relevance:
        """The labels as a :class:`Relevance`; ``gallery_labels=None`` is leave-one-out: each query's own row
        is the gallery item it may not retrieve. The one place every entry point gets its labels from."""
        check = check_labels if self.label_comparison_fn is None else check_label_rows
        ql = check(query_labels, "query_labels", num_queries, queries_what)
        if gallery_labels is None:
            return Relevance(ql, ql, torch.arange(ql.shape[0]), self.label_comparison_fn)
        gl = check(
            gallery_labels, "gallery_labels", num_gallery, "gallery" if num_gallery is not None else None
        )
        if gl.shape[0] == 0:
            raise ValueError("gallery_labels is empty: a gallery needs at least one item to retrieve")
        if gl.shape[1:] != ql.shape[1:]:
            raise ValueError(
                f"gallery_labels rows have shape {tuple(gl.shape[1:])} but query_labels rows {tuple(ql.shape[1:])}"
            )
        return Relevance(ql, gl, None, self.label_comparison_fn)

    def _depth(self, num_relevant: Tensor) -> int | None:
        """The deepest ranking the metrics need: None for the whole gallery, 0 for no ranking at all."""
        max_relevant = int(num_relevant.max())
        depths = [r.depth(max_relevant) for r in self.metrics if r.spec.needs != "clustering"]
        if any(d is None for d in depths):
            return None
        return max([d for d in depths if d is not None], default=0)

    def _search(
        self,
        q: Tensor,
        source: BlockSource | None,
        relevance: Relevance,
        num_relevant: Tensor,
        device: torch.device,
        stats: SearchStats | None = None,
    ) -> tuple[RelevantRanks | None, NeighborLists | None]:
        """Rank the gallery exactly as deep as the metrics need, reading it as few times as possible."""
        ranks = None
        if self._depth(num_relevant) is None:  # some metric needs the whole ranking: exact streamed count
            ranks = ranks_exhaustive(
                q,
                relevance.query_labels,
                source if source is not None else q,
                relevance.gallery_labels,
                metric=self.metric,
                exclude=relevance.exclude,
                device=device,
                block_size=self.block_size,
                progress=show_progress(
                    self.progress, q.shape[0] * relevance.gallery_labels.shape[0] * q.shape[1]
                ),
                num_relevant=num_relevant,
                label_comparison_fn=self.label_comparison_fn,
                precision=self.precision,
                stats=stats,
            )
            source = None if source is None else already_checked(source)
        # Exhaustive ranks serve every ranking metric; a kNN is then needed only for neighbour lists.
        max_relevant = int(num_relevant.max())
        searched = [
            r
            for r in self.metrics
            if r.spec.needs == "neighbors" or (r.spec.needs == "ranks" and ranks is None)
        ]
        depth = max((r.depth(max_relevant) or 0 for r in searched), default=0)
        if not depth:
            return ranks, None
        scores, indices = knn(
            q,
            source,
            k=depth,
            metric=self.metric,
            backend=self.backend,
            faiss=self.faiss,
            block_size=self.block_size,
            device=device,
            progress=self.progress,
            precision=self.precision,
            stats=None if self.backend == "faiss" else stats,
        )
        scores, indices = scores.cpu(), indices.cpu()
        if ranks is None:
            ranks = self._ranks_of(indices, relevance, num_relevant)
        found = NeighborLists(
            scores, indices, relevance.query_labels, relevance.gallery_labels, self.metric != "l2"
        )
        return ranks, found

    def _ranks_of(self, ranking: Tensor, relevance: Relevance, num_relevant: Tensor) -> RelevantRanks:
        return ranks_from_ranking(
            ranking,
            relevance.query_labels,
            relevance.gallery_labels,
            num_relevant,
            label_comparison_fn=self.label_comparison_fn,
        )

    def _refuse_clustering(self, why: str) -> None:
        names = [r.name for r in self.metrics if r.spec.needs == "clustering"]
        if names:
            raise ValueError(f"{', '.join(names)} {why}")

    def _finish(
        self,
        ranks: RelevantRanks | None,
        found: NeighborLists | None,
        relevance: Relevance,
        num_relevant: Tensor,
        clustering: tuple[Tensor, Tensor] | None,
        whole: bool = False,
    ) -> RetrievalResult:
        """Every requested metric from the search results; ``whole``: the ranking covers the whole gallery."""
        max_relevant = int(num_relevant.max())
        per_query_values = {} if ranks is None else self._per_query(ranks, max_relevant, whole)
        return self._result(per_query_values, found, relevance, num_relevant, clustering, whole)

    def _per_query(self, ranks: RelevantRanks, max_relevant: int, whole: bool = False) -> dict[str, Tensor]:
        """(Q,) float64 values of each ranking metric, NaN for queries without relevant items. Row-wise, so a
        sharded evaluation computes them for its own queries and gathers them (:mod:`.streaming`)."""
        values: dict[str, Tensor] = {}
        for r in self.metrics:
            if r.spec.needs == "ranks":
                _check_depth(r.name, r.depth(max_relevant), ranks.depth, whole)
                values[r.name] = r.per_query(ranks)
        return values

    def _result(
        self,
        per_query_values: dict[str, Tensor],
        found: NeighborLists | None,
        relevance: Relevance,
        num_relevant: Tensor,
        clustering: tuple[Tensor, Tensor] | None,
        whole: bool = False,
    ) -> RetrievalResult:
        """Every requested metric from the per-query values of the ranking metrics and the other inputs."""
        values: dict[str, float] = {}
        per_query: dict[str, Tensor] = {}
        max_relevant = int(num_relevant.max())
        classes = relevance.classes() if self.average == "class" else None
        assignment = None
        for r in self.metrics:
            if r.spec.needs == "clustering":
                assert clustering is not None
                embeddings, labels = clustering
                if assignment is None:
                    num_classes = int(torch.unique(relevance.query_labels).numel())
                    assignment, _ = kmeans(embeddings, num_classes, seed=self.kmeans_seed)
                values[r.name] = float(r.spec.fn(assignment, labels))
                continue
            depth = r.depth(max_relevant)
            if r.spec.needs == "neighbors":
                assert found is not None and depth is not None
                _check_depth(r.name, depth, found.indices.shape[1], whole)
                values[r.name] = r.neighbors(found.truncate(depth))
                continue
            v = per_query_values[r.name]
            values[r.name] = reduce_queries(v, self.no_relevant, r.name, classes)
            if self.return_per_query:
                per_query[r.name] = v
        num_queries = int(relevance.query_labels.shape[0])
        return RetrievalResult(values, per_query, num_queries, int((num_relevant == 0).sum()))


def _check_depth(name: str, needed: int | None, available: int | None, whole: bool) -> None:
    """Refuse a metric the ranking is too shallow for, rather than computing a different one."""
    if available is None or (needed is None and whole) or (needed is not None and needed <= available):
        return
    if needed is None:
        raise ValueError(
            f"{name} needs every gallery item ranked, but the rankings stop at {available}; "
            "use a truncated variant (e.g. map@K, mrr@K) or rank the whole gallery"
        )
    raise ValueError(f"{name} needs rankings at least {needed} deep, but they stop at {available}")


def _available(relevance: Relevance) -> int:
    """Gallery items each query can retrieve."""
    return relevance.gallery_labels.shape[0] - int(relevance.exclude is not None)


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
