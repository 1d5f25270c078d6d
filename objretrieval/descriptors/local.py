"""Local descriptors in AMES's row layout, and how they are selected from feature maps.

Each image keeps its ``topk`` strongest local descriptors, one row each:
``[loc_a, loc_b, scale_index, pad_flag, weight, descriptor...]`` (5 + D columns), sorted by descending weight,
followed by padding rows that are zero except ``pad_flag = 1``. The weight is a detector's attention score, or
the descriptor's L2 norm without a detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from objretrieval.display import SummaryRepr

#: Columns before the descriptor: location (2), scale index, padding flag, weight.
HEADER = 5
LOCATION, SCALE, PAD, WEIGHT = slice(0, 2), 2, 3, 4


@dataclass(frozen=True, repr=False)
class ScaleFeatures(SummaryRepr):
    """The local features of one image at one scale.

    Attributes:
        descriptors: (N, D) one descriptor per spatial position (row-major over the feature map).
        weights: (N,) their selection weights.
        locations: (N, 2) their positions.
    """

    descriptors: Tensor
    weights: Tensor
    locations: Tensor


def patch_locations(grid_hw: tuple[int, int], image_hw: tuple[int, int], patch: int) -> Tensor:
    """(h * w, 2) patch centres relative to the image size, row-major: ``((r p + p/2) / H, (c p + p/2) / W)``."""
    (h, w), (height, width) = grid_hw, image_hw
    rows = (torch.arange(h) * patch + patch / 2) / height
    cols = (torch.arange(w) * patch + patch / 2) / width
    return torch.stack([rows.repeat_interleave(w), cols.repeat(h)], dim=1)


def receptive_field_centres(grid_hw: tuple[int, int], scale: float, stride: int = 16) -> Tensor:
    """(h * w, 2) receptive-field centres of a CNN map in original-image pixels, row-major.

    For CVNet's res4 (receptive field 291, stride 16, padding 145) the centre of position (r, c) is
    ``(16 r, 16 c)`` in the resized image, ``(16 r / scale, 16 c / scale)`` in the original.
    """
    h, w = grid_hw
    rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=1) * stride / scale


def select_top(scales: Sequence[ScaleFeatures], topk: int) -> Tensor:
    """(topk, 5 + D) rows of the ``topk`` highest-weighted descriptors over all scales, jointly.

    Rows are sorted by descending weight; when fewer than ``topk`` descriptors exist the rest are padding rows.
    """
    descriptors = torch.cat([s.descriptors for s in scales])
    weights = torch.cat([s.weights for s in scales])
    locations = torch.cat([s.locations.to(descriptors.dtype) for s in scales])
    scale_of = torch.cat(
        [torch.full((len(s.weights),), i, dtype=descriptors.dtype) for i, s in enumerate(scales)]
    )
    count = min(topk, weights.numel())
    top, ids = weights.topk(count)
    rows = torch.zeros(topk, HEADER + descriptors.shape[1], dtype=descriptors.dtype)
    rows[:count, LOCATION] = locations[ids]
    rows[:count, SCALE] = scale_of[ids]
    rows[:count, WEIGHT] = top
    rows[:count, HEADER:] = descriptors[ids]
    rows[count:, PAD] = 1.0
    return rows


def global_descriptor(scales: Sequence[ScaleFeatures]) -> Tensor:
    """(D,) L2-normalised mean over scales of the L2-normalised weighted mean descriptor of each scale."""
    per_scale = [F.normalize((s.weights[:, None] * s.descriptors).mean(0), dim=0) for s in scales]
    return F.normalize(torch.stack(per_scale).mean(0), dim=0)


def split_rows(rows: Tensor, max_descriptors: int | None = None) -> tuple[Tensor, Tensor]:
    """Descriptors and padding mask from (..., topk, 5 + D) rows, keeping the first ``max_descriptors``.

    Returns:
        ``(descriptors, padding)``: (..., T, D) and (..., T) bool, True at padding rows.
    """
    if max_descriptors is not None:
        rows = rows[..., :max_descriptors, :]
    return rows[..., HEADER:], rows[..., PAD] > 0
