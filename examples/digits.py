"""scikit-learn's bundled handwritten digits as a tiny zero-shot retrieval benchmark, shared by the examples.

Deep metric learning papers train on some classes and evaluate retrieval on unseen ones; here digits 0-4 are
seen and 5-9 unseen. Clean 8x8 digits are easy even for an untrained network, so the test set is made of
random views: each digit rotated, scaled and shifted at random.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

SIZE = 32  # digits are upsampled from 8x8 to SIZE x SIZE


def load(seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 0-4 (``seen``) or 5-9 as (N, 1, SIZE, SIZE) floats in [0, 1], and (N,) int64 labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    labels = torch.from_numpy(digits.target).long()
    keep = labels < 5 if seen else labels >= 5
    return F.interpolate(images[keep], size=SIZE, mode="bilinear", align_corners=False), labels[keep]


def zero_shot_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train images, train labels, test views, test labels)``: digits 0-4 as they are, 5-9 as random views.

    The test views depend only on ``seed`` (drawn from their own generator, seeded ``1000 + seed``).
    """
    train_images, train_labels = load(seen=True)
    test_images, test_labels = load(seen=False)
    test_views = random_views(test_images, torch.Generator().manual_seed(1000 + seed))
    return train_images, train_labels, test_views, test_labels


def random_views(
    images: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 35.0,
    scale: tuple[float, float] = (0.7, 1.1),
    shift: float = 0.15,
) -> torch.Tensor:
    """One random rotation, scaling and shift per image, drawn from ``generator`` (vectorised)."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-degrees, degrees) * math.pi / 180
    zoom = uniform(*scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, 2 * uniform(-shift, shift)], dim=1),
            torch.stack([sin, cos, 2 * uniform(-shift, shift)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)
