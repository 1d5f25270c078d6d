"""Metric-learning losses with pytorch-metric-learning's call convention.

```python
loss = ContextualLoss()                       # or ContrastiveLoss(), TripletMarginLoss(selection="semihard"), ...
value = loss(embeddings, labels)              # (N, D) floats, (N,) integer labels
value = loss(embeddings, labels, miner(embeddings, labels))   # with mined pairs or triplets
```

Pairwise models (AMES) train on one logit per pair: :class:`PairBCELoss`, :class:`PairDistillationLoss`.
Self-supervised set embeddings (MILE) train with :class:`DINOLoss`. AVSL's per-level losses on its
pairwise distances: :class:`AVSLProxyAnchorLoss`, :class:`AVSLMarginLoss`.
"""

from objretrieval.losses.adversarial import AdversarialDecorrelationLoss, grad_reverse
from objretrieval.losses.avsl import (
    AVSL_LEVEL_WEIGHTS,
    AVSLLossOutput,
    AVSLMarginLoss,
    AVSLPairwiseProxyAnchorLoss,
    AVSLProxyAnchorLoss,
    proxy_anchor_distance_loss,
)
from objretrieval.losses.base import MetricLoss, PairBatch, ParametricLoss, Reduction
from objretrieval.losses.contextual import ContextualLoss, contextual_similarity, contextual_term
from objretrieval.losses.contrastive import ContrastiveLoss, margin_contrastive, similarity_regularizer
from objretrieval.losses.cross_batch_memory import CrossBatchMemory
from objretrieval.losses.dino import DINOLoss, teacher_temperature_schedule
from objretrieval.losses.margin import MarginLoss
from objretrieval.losses.multi_similarity import MultiSimilarityLoss
from objretrieval.losses.pairwise import PairBCELoss, PairDistillationLoss
from objretrieval.losses.proxy import ProxyAnchorLoss, ProxyNCALoss
from objretrieval.losses.ranking_ap import ROADMAPLoss, SmoothAPLoss, ranking_average_precision
from objretrieval.losses.supcon import SupConLoss, supervised_contrastive
from objretrieval.losses.triplet import TripletMarginLoss

__all__ = [
    "AVSL_LEVEL_WEIGHTS",
    "AVSLLossOutput",
    "AVSLMarginLoss",
    "AVSLPairwiseProxyAnchorLoss",
    "AVSLProxyAnchorLoss",
    "AdversarialDecorrelationLoss",
    "ContextualLoss",
    "ContrastiveLoss",
    "CrossBatchMemory",
    "DINOLoss",
    "MarginLoss",
    "MetricLoss",
    "MultiSimilarityLoss",
    "PairBCELoss",
    "PairBatch",
    "PairDistillationLoss",
    "ParametricLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "ROADMAPLoss",
    "Reduction",
    "SmoothAPLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "contextual_similarity",
    "contextual_term",
    "grad_reverse",
    "margin_contrastive",
    "proxy_anchor_distance_loss",
    "ranking_average_precision",
    "similarity_regularizer",
    "supervised_contrastive",
    "teacher_temperature_schedule",
]
