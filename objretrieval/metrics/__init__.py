"""Retrieval and clustering metrics.

The :class:`RetrievalEvaluator` covers the deep-metric-learning protocols (leave-one-out and query/gallery);
the functions below it serve custom loops and the landmark protocols.
"""

from objretrieval.metrics.clustering import kmeans, normalized_mutual_info, pairwise_f1
from objretrieval.metrics.evaluator import RetrievalEvaluator, RetrievalResult
from objretrieval.metrics.ranks import (
    RelevantRanks,
    count_relevant,
    ranks_exhaustive,
    ranks_from_ranking,
)
from objretrieval.metrics.retrieval import (
    average_precision,
    map_at_r,
    precision_at_1,
    r_precision,
    recall_at_k,
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

__all__ = [
    "AverageRecall",
    "GLDv2Result",
    "ProtocolResult",
    "RelevantRanks",
    "RetrievalEvaluator",
    "RetrievalResult",
    "RevisitedResult",
    "average_precision",
    "average_recall_at_k",
    "count_relevant",
    "gldv2_map",
    "junk_adjusted_ranks",
    "kmeans",
    "map_at_r",
    "mean_average_precision",
    "normalized_mutual_info",
    "pairwise_f1",
    "precision_at_1",
    "r_precision",
    "ranks_exhaustive",
    "ranks_from_ranking",
    "recall_at_k",
    "reduce_queries",
    "revisited_map",
    "trapezoidal_average_precision",
]
