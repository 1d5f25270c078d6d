"""Streaming exact kNN search (torch, CPU or CUDA) with an optional faiss backend.

```python
from objretrieval.search import FaissOptions, knn

scores, indices = knn(queries, gallery, k=10)            # query vs gallery
scores, indices = knn(embeddings, k=10)                   # leave-one-out on one set
scores, indices = knn(queries, h5py_file["features"], k=100, metric="ip", progress=True)
scores, indices = knn(queries, gallery, k=10, backend="faiss", faiss=FaissOptions("ivf", nprobe=32))
scores, indices = pairwise_knn(AVSLScorer(avsl, features), k=10, exclude_self=True)  # pairwise scores
```
"""

from objretrieval.search.exact import PRECISIONS, Precision, SearchStats, exact_scores
from objretrieval.search.faiss_backend import FaissOptions
from objretrieval.search.knn import Backend, Neighbors, knn
from objretrieval.search.pairwise import BlockScorer, PairwiseScorer, pairwise_knn, score_candidates
from objretrieval.search.scoring import METRICS, Metric
from objretrieval.search.sources import BlockSource, GalleryLike

__all__ = [
    "METRICS",
    "PRECISIONS",
    "Backend",
    "BlockScorer",
    "BlockSource",
    "FaissOptions",
    "GalleryLike",
    "Metric",
    "Neighbors",
    "PairwiseScorer",
    "Precision",
    "SearchStats",
    "exact_scores",
    "knn",
    "pairwise_knn",
    "score_candidates",
]
