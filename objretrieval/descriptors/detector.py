"""The local feature detector of AMES (after DOLG/CVNet's spatial attention): 1x1 convolutions on a feature map."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval.display import ConfigRepr
from objretrieval.models.checkpoint import load_state_dict_into, read_checkpoint, unwrap_state_dict


class SpatialAttention2d(ConfigRepr, nn.Module):
    """``h = BN(conv1x1(x))``; descriptors ``normalize(h)``; weights ``softplus(conv1x1(relu(h)))``.

    Parameter names follow the official module (``conv1``, ``bn``, ``conv2``).

    Args:
        channels: feature channels C.
    """

    config_attributes: ClassVar[dict[str, str | None]] = {"channels": "conv1.in_channels"}

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 1, 1)
        for conv in (self.conv1, self.conv2):  # the official ResNet-style initialisation
            nn.init.normal_(conv.weight, std=(2.0 / conv.out_channels) ** 0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, h, w). Returns descriptors (B, C, h, w), L2-normalised over C, and weights (B, 1, h, w)."""
        h = self.bn(self.conv1(x))
        return F.normalize(h, dim=1, eps=1e-15), F.softplus(self.conv2(F.relu(h)))

    @classmethod
    def from_checkpoint(cls, path: str, channels: int) -> SpatialAttention2d:
        """Load the released detector weights (``{'state': state_dict}``), strictly, in evaluation mode."""
        detector = cls(channels)
        load_state_dict_into(detector, unwrap_state_dict(read_checkpoint(path)))
        return detector.eval()

    @torch.no_grad()
    def describe(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        """One image's (C, h, w) map -> (h * w, C) descriptors and (h * w,) weights, row-major."""
        desc, weights = self(feature_map[None])
        return desc[0].flatten(1).T, weights[0, 0].flatten()
