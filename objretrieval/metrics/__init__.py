"""Retrieval and clustering metrics.

The :class:`RetrievalEvaluator` covers the deep-metric-learning protocols (leave-one-out and query/gallery);
:class:`RetrievalMetrics` is the same engine as an ``nn.Module`` that accumulates batches, across processes too;
the functions below it serve custom loops and the landmark protocols. Each metric name is a row of the metric
table (:func:`list_metrics`); :func:`register_metric` adds one.
"""

from objretrieval.metrics.clustering import adjusted_mutual_info, kmeans, normalized_mutual_info, pairwise_f1
from objretrieval.metrics.evaluator import RetrievalEvaluator, RetrievalResult
from objretrieval.metrics.ranks import (
    LabelComparison,
    Relevance,
    RelevantRanks,
    count_relevant,
    ranks_exhaustive,
    ranks_from_ranking,
)
from objretrieval.metrics.registry import MetricSpec, NeighborLists, list_metrics, register_metric
from objretrieval.metrics.retrieval import (
    average_precision,
    map_at_r,
    precision_at_1,
    r_precision,
    recall_at_k,
    reciprocal_rank,
    reduce_queries,
    trapezoidal_average_precision,
)
from objretrieval.metrics.revisited import (
    GLDv2Result,
    ProtocolResult,
    RevisitedResult,
    gldv2_map,
    junk_adjusted_ranks,
    mean_average_precision,
    revisited_map,
)
from objretrieval.metrics.set_retrieval import AverageRecall, average_recall_at_k
from objretrieval.metrics.streaming import RetrievalMetrics

__all__ = [
    "AverageRecall",
    "GLDv2Result",
    "LabelComparison",
    "MetricSpec",
    "NeighborLists",
    "ProtocolResult",
    "Relevance",
    "RelevantRanks",
    "RetrievalEvaluator",
    "RetrievalMetrics",
    "RetrievalResult",
    "RevisitedResult",
    "adjusted_mutual_info",
    "average_precision",
    "average_recall_at_k",
    "count_relevant",
    "gldv2_map",
    "junk_adjusted_ranks",
    "kmeans",
    "list_metrics",
    "map_at_r",
    "mean_average_precision",
    "normalized_mutual_info",
    "pairwise_f1",
    "precision_at_1",
    "r_precision",
    "ranks_exhaustive",
    "ranks_from_ranking",
    "recall_at_k",
    "reciprocal_rank",
    "reduce_queries",
    "register_metric",
    "revisited_map",
    "trapezoidal_average_precision",
]
