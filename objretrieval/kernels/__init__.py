"""Triton kernels, each beside the torch reference it is tested against (see the Kernels docs page).

```python
import torch
from objretrieval.kernels import hamming_topk

codes = torch.randint(0, 256, (100, 16), dtype=torch.uint8)  # 128-bit packed codes
distances, indices = hamming_topk(codes[:3], codes, k=5)     # nearest codes by Hamming distance
```
"""

from objretrieval.kernels.avsl import avsl_distance
from objretrieval.kernels.dispatch import MEASURED, KernelBackend, Measurement, resolve_backend
from objretrieval.kernels.hamming import hamming_distances, hamming_topk
from objretrieval.kernels.knn import fused_topk
from objretrieval.kernels.pairwise_losses import (
    tiled_contrastive_loss,
    tiled_multi_similarity_loss,
    tiled_supcon_loss,
)

__all__ = [
    "MEASURED",
    "KernelBackend",
    "Measurement",
    "avsl_distance",
    "fused_topk",
    "hamming_distances",
    "hamming_topk",
    "resolve_backend",
    "tiled_contrastive_loss",
    "tiled_multi_similarity_loss",
    "tiled_supcon_loss",
]
