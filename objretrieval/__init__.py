"""objretrieval: object and instance retrieval and deep metric learning for PyTorch.

Top-level names cover the common path; the subpackages hold the rest:

- :mod:`objretrieval.models`: registry, ``create_model``, checkpoint I/O.
- :mod:`objretrieval.search`: streaming exact kNN (torch) and faiss indexes.
- :mod:`objretrieval.metrics`: Recall@K, MAP@R, mAP, NMI, revisited Oxford/Paris, GLDv2, AR@K.
- :mod:`objretrieval.losses`, :mod:`objretrieval.miners`, :mod:`objretrieval.samplers`: training.
- :mod:`objretrieval.descriptors`: local-descriptor extraction (DINOv2, CVNet), AMES's row layout, h5py stores.
- :mod:`objretrieval.reranking`: global shortlist -> pairwise (AMES) rerank -> fused ranking and evaluation.
- :mod:`objretrieval.data`: objects as folders of images (set selection, padding, multi-crop views).
- :mod:`objretrieval.training`: step helpers for self-supervised training (MILE), schedules, EMA.
- :mod:`objretrieval.distributed`: losses that see the global batch, cross-rank gathers, the sharded kNN.
- :mod:`objretrieval.kernels`: Triton kernels beside their torch references (Hamming top-k).
"""

from objretrieval.metrics import RetrievalEvaluator, RetrievalMetrics, RetrievalResult
from objretrieval.models import (
    PretrainedCfg,
    create_model,
    list_models,
    list_pretrained,
    register_model,
    save_checkpoint,
)
from objretrieval.search import Neighbors, knn

__version__ = "0.1.0"

__all__ = [
    "Neighbors",
    "PretrainedCfg",
    "RetrievalEvaluator",
    "RetrievalMetrics",
    "RetrievalResult",
    "__version__",
    "create_model",
    "knn",
    "list_models",
    "list_pretrained",
    "register_model",
    "save_checkpoint",
]
