"""scikit-learn's bundled handwritten digits as a tiny zero-shot retrieval benchmark, shared by the examples.

Deep metric learning papers train on some classes and evaluate retrieval on unseen ones; here digits 0-4 are
seen and 5-9 unseen. Clean 8x8 digits are easy even for an untrained network, so the test set is made of
random views: each digit rotated, scaled and shifted at random.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from objretrieval.losses import ParametricLoss
from objretrieval.samplers import MPerClassSampler

SIZE = 32  # digits are upsampled from 8x8 to SIZE x SIZE


def load(seen: bool, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits 0-4 (``seen``) or 5-9 as (N, 1, size, size) floats in [0, 1], and (N,) int64 labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    labels = torch.from_numpy(digits.target).long()
    keep = labels < 5 if seen else labels >= 5
    return F.interpolate(images[keep], size=size, mode="bilinear", align_corners=False), labels[keep]


def zero_shot_split(
    seed: int, size: int = SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train images, train labels, test views, test labels)``: digits 0-4 as they are, 5-9 as random views.

    The test views depend only on ``seed`` (drawn from their own generator, seeded ``1000 + seed``).
    """
    train_images, train_labels = load(seen=True, size=size)
    test_images, test_labels = load(seen=False, size=size)
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


def small_cnn(dim: int = 64, width: int = 16) -> nn.Sequential:
    """What a new user writes first: three conv layers, no batch norm, an unnormalised linear output.

    Its untrained embedding is a poor, nearly collapsed one (cosine similarities close to 1 across a batch),
    the starting point a loss's defaults must train from.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, dim),
    )


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Embeddings of ``images`` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    seed: int,
    m: int = 16,
    classes_per_batch: int = 5,
    lr: float = 1e-3,
    miner: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    augment: bool = True,
) -> nn.Module:
    """Adam on class-balanced batches (``classes_per_batch`` x ``m``) of random views, for ``steps`` steps.

    Parameters of ``loss_fn`` (proxies, margins) learn at the loss's own rate (``param_groups``), or at 100
    times ``lr`` for other losses with parameters (pytorch-metric-learning's), as the proxy papers do.
    Deterministic in ``seed`` (batches and views) on a fixed thread count.
    """
    sampler = MPerClassSampler(labels, batch_size=classes_per_batch * m, m=m, seed=seed)
    views = torch.Generator().manual_seed(seed)
    groups = [{"params": list(model.parameters()), "lr": lr}]
    if isinstance(loss_fn, ParametricLoss):
        groups += loss_fn.param_groups(lr)
    elif any(p.requires_grad for p in loss_fn.parameters()):
        groups.append({"params": [p for p in loss_fn.parameters() if p.requires_grad], "lr": 100 * lr})
    optimizer = torch.optim.Adam(groups)
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        model.train()
        for batch in sampler:
            if step == steps:
                break
            index = torch.tensor(batch)
            x = random_views(images[index], views) if augment else images[index]
            out, y = model(x), labels[index]
            loss = loss_fn(out, y) if miner is None else loss_fn(out, y, miner(out, y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        epoch += 1
    return model.eval()
