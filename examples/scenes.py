"""Synthetic photographs for the examples: random scenes of shapes, and views of them under random poses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def draw_scene(generator: torch.Generator, height: int, width: int, shapes: int = 14) -> torch.Tensor:
    """A (3, H, W) image in [0, 1]: a colour gradient with random rectangles, discs and stripes."""
    ys = torch.linspace(0, 1, height)[:, None].expand(height, width)
    xs = torch.linspace(0, 1, width)[None, :].expand(height, width)
    a, b = torch.rand(2, 3, 1, 1, generator=generator)
    image = a * ys + b * (1 - xs)
    for _ in range(shapes):
        colour = torch.rand(3, 1, 1, generator=generator)
        cy, cx, size, kind = torch.rand(4, generator=generator).tolist()
        size = 0.05 + 0.2 * size
        if kind < 0.4:
            mask = ((ys - cy).abs() < size) & ((xs - cx).abs() < 1.5 * size)
        elif kind < 0.8:
            mask = (ys - cy) ** 2 + ((xs - cx) * width / height) ** 2 < size**2
        else:
            mask = (torch.sin((xs + ys) * 60 * size) > 0) & ((ys - cy).abs() < size)
        image = torch.where(mask, colour, image)
    return image.clamp(0, 1)


def photograph(scene: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """A view of a scene: random rotation, zoom and shift (larger with ``strength``) and a brightness change."""
    height, width = scene.shape[1:]
    u = (torch.rand(5, generator=generator) * 2 - 1).tolist()
    angle, zoom = 0.25 * strength * u[0], 1.0 + 0.35 * strength * u[1]
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, 0.3 * strength * u[2]], [sin, cos, 0.3 * strength * u[3]]])
    grid = F.affine_grid(theta[None], [1, 3, height, width], align_corners=False)
    view = F.grid_sample(scene[None], grid, padding_mode="reflection", align_corners=False)[0]
    return (view * (1.0 + 0.2 * strength * u[4])).clamp(0, 1)
