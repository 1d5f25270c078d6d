"""Rerank a global kNN shortlist with a pairwise model and fuse the scores.

The pipeline of AMES (Suma et al., ECCV 2024), usable with any :class:`~objretrieval.search.PairwiseScorer`:

1. a global descriptor shortlists the K nearest database images of each query (:func:`objretrieval.search.knn`;
   its ``Neighbors`` are a shortlist as they are);
2. a pairwise model scores the query against the top ``k`` of them (``raw`` logits, :func:`score_shortlist`);
3. ``lamb * global + (1 - lamb) * sigmoid(temp * raw)`` re-sorts those k; the rest keeps the global order
   (:func:`rerank`); missing entries (index -1 from approximate indexes) are never scored and rank last;
4. the final ranking is evaluated, for revisited Oxford/Paris with the official junk handling, over a grid of
   (k, lamb, temp), reporting the best combination (the official code reports the last one)
   (:func:`rerank_revisited`).

Modules: :mod:`~objretrieval.reranking.shortlist` (shortlist and fusion), :mod:`~objretrieval.reranking.revisited`
(the sweep), :mod:`~objretrieval.reranking.ames` (the AMES scorer and its database cache).
"""

from objretrieval.models.ames import AMES_FUSION
from objretrieval.reranking.ames import AMESScorer, DatabaseCache
from objretrieval.reranking.revisited import Combination, RevisitedReranking, rerank_revisited
from objretrieval.reranking.shortlist import (
    MISSING,
    NeighborsLike,
    Shortlist,
    ShortlistLike,
    TableScorer,
    fuse,
    rerank,
    score_shortlist,
    score_table,
)
from objretrieval.search.pairwise import BlockScorer, PairwiseScorer, score_candidates

__all__ = [
    "AMES_FUSION",
    "MISSING",
    "AMESScorer",
    "BlockScorer",
    "Combination",
    "DatabaseCache",
    "NeighborsLike",
    "PairwiseScorer",
    "RevisitedReranking",
    "Shortlist",
    "ShortlistLike",
    "TableScorer",
    "fuse",
    "rerank",
    "rerank_revisited",
    "score_candidates",
    "score_shortlist",
    "score_table",
]
