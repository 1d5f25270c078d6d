"""Small random-weight networks the tests build, each written once."""

from __future__ import annotations

import timm
import torch
from torch import nn


def tiny_dinov2_vit(embed_dim: int = 32, depth: int = 1, num_heads: int = 2, seed: int = 0) -> nn.Module:
    """A DINOv2-style ViT with registers (timm's layout, random weights, eval mode) whose final norm looks
    trained: with the default one every token has norm sqrt(embed_dim) and descriptor weights all tie."""
    torch.manual_seed(seed)
    vit = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        dynamic_img_size=True,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
    )
    with torch.no_grad():
        vit.norm.weight.uniform_(0.5, 1.5)
        vit.norm.bias.normal_(std=0.1)
    return vit.eval()
