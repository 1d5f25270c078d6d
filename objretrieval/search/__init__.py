"""Streaming exact kNN search (torch, CPU or CUDA) with an optional faiss backend.

```python
from objretrieval.search import knn

scores, indices = knn(queries, gallery, k=10)            # query vs gallery
scores, indices = knn(embeddings, k=10)                   # leave-one-out on one set
scores, indices = knn(queries, h5py_file["features"], k=100, metric="ip", progress=True)
scores, indices = pairwise_knn(AVSLScorer(avsl, features), k=10, exclude_self=True)  # pairwise scores
```
"""

from objretrieval.search.knn import Neighbors, knn
from objretrieval.search.pairwise import PairwiseScorer, pairwise_knn
from objretrieval.search.scoring import METRICS, Metric
from objretrieval.search.sources import BlockSource, GalleryLike

__all__ = [
    "METRICS",
    "BlockSource",
    "GalleryLike",
    "Metric",
    "Neighbors",
    "PairwiseScorer",
    "knn",
    "pairwise_knn",
]
