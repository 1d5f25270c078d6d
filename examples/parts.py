"""Synthetic images made of parts, for the AMES examples (``ames_train.py``, the docs' reranking picture).

Each object is a set of part descriptors; an image of it shows a random subset of those parts (with noise)
among background clutter drawn from a pool shared by all objects, so two images match when they share parts.
An image's local descriptors are exactly its parts' and clutter's vectors, sorted by weight (their norm) as in
AMES's files. :func:`render` draws an image as a grid of small glyphs, one per descriptor, the same glyph for
the same part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from objretrieval.descriptors import HEADER


@dataclass(frozen=True)
class PartImages:
    """Images of part-made objects.

    Attributes:
        descriptors: (N, T, D) local descriptors, sorted by weight (norm), strongest first.
        tokens: (N, T) what each descriptor shows: part ``j`` of object ``o`` is ``o * parts + j``, clutter
            item ``c`` is ``objects * parts + c``.
        labels: (N,) object of each image.
        is_clutter: (N, T) bool, True where a descriptor shows clutter.
    """

    descriptors: torch.Tensor
    tokens: torch.Tensor
    labels: np.ndarray
    is_clutter: torch.Tensor

    def rows(self) -> torch.Tensor:
        """(N, T, 5 + D) rows in AMES's file layout: ``[loc_a, loc_b, scale, pad, weight, descriptor]``."""
        n, t, d = self.descriptors.shape
        rows = torch.zeros(n, t, HEADER + d)
        rows[..., 4], rows[..., HEADER:] = self.descriptors.norm(dim=-1), self.descriptors
        return rows

    def global_descriptors(self) -> torch.Tensor:
        """(N, D) a weak global descriptor: the normalised mean of each image's local descriptors."""
        return F.normalize(self.descriptors.mean(dim=1), dim=-1)


def part_images(
    objects: int,
    images_per_object: int,
    dim: int,
    rows: int,
    generator: torch.Generator,
    *,
    parts: int = 24,
    clutter: int | torch.Tensor = 64,
    visible: int | None = None,
    noise: float = 0.05,
) -> PartImages:
    """``images_per_object`` images of each of ``objects`` new objects, ``rows`` descriptors each.

    Args:
        parts: parts per object.
        clutter: the clutter pool shared by all objects: its size (a new random pool), or its (C, D) unit
            vectors (e.g. the same background in training and test images).
        visible: parts shown per image (default half the rows); the other rows are clutter.
        noise: standard deviation of the Gaussian noise added to each descriptor.
    """
    visible = rows // 2 if visible is None else visible
    if not 1 <= visible <= min(parts, rows):
        raise ValueError(f"visible must be in [1, min(parts, rows) = {min(parts, rows)}], got {visible}")
    part_vectors = F.normalize(torch.randn(objects, parts, dim, generator=generator), dim=-1)
    if isinstance(clutter, int):
        clutter = F.normalize(torch.randn(clutter, dim, generator=generator), dim=-1)
    labels = np.repeat(np.arange(objects), images_per_object)
    descriptors, tokens = (
        torch.empty(len(labels), rows, dim),
        torch.empty(len(labels), rows, dtype=torch.long),
    )
    for i, label in enumerate(labels):
        shown = torch.randperm(parts, generator=generator)[:visible]
        background = torch.randint(0, len(clutter), (rows - visible,), generator=generator)
        vectors = torch.cat([part_vectors[label, shown], clutter[background]])
        vectors = vectors + noise * torch.randn(rows, dim, generator=generator)
        order = vectors.norm(dim=1).argsort(descending=True)
        descriptors[i] = vectors[order]
        tokens[i] = torch.cat([label * parts + shown, objects * parts + background])[order]
    return PartImages(descriptors, tokens, labels, tokens >= objects * parts)


def sample_pairs(
    labels: np.ndarray, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``batch`` (query, database, is_match) pairs, half matching (same object, another image), half not."""
    queries = rng.integers(0, len(labels), batch)
    match = np.arange(batch) % 2 == 0
    database = np.empty(batch, dtype=np.int64)
    for j, (q, m) in enumerate(zip(queries, match, strict=True)):
        pool = (
            np.flatnonzero((labels == labels[q]) & (np.arange(len(labels)) != q))
            if m
            else np.flatnonzero(labels != labels[q])
        )
        database[j] = rng.choice(pool)
    return queries, database, match


def _glyph(token: int, size: int, muted: bool) -> torch.Tensor:
    """A (3, size, size) tile drawn from the token alone: a shape in a colour on a background colour.

    Clutter glyphs (``muted``) are greyish so that an image's object parts stand out to a reader.
    """
    g = torch.Generator().manual_seed(1_000_003 * token + 17)
    fg, bg = torch.rand(2, 3, 1, 1, generator=g)
    if muted:
        fg, bg = 0.35 + 0.3 * fg.mean() + 0.1 * fg, 0.5 + 0.1 * bg.mean().expand(3, 1, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    shape = int(torch.randint(0, 5, (1,), generator=g))
    if shape == 0:
        mask = xs**2 + ys**2 < 0.55
    elif shape == 1:
        mask = (xs.abs() < 0.65) & (ys.abs() < 0.65)
    elif shape == 2:
        mask = (xs.abs() < 0.25) | (ys.abs() < 0.25)
    elif shape == 3:
        mask = ys > 2 * xs.abs() - 0.8
    else:
        mask = torch.sin(4 * (xs + ys)) > 0
    return torch.where(mask, fg, bg)


def render(images: PartImages, index: int, *, tile: int = 12, columns: int | None = None) -> torch.Tensor:
    """(3, H, W) picture of image ``index``: its descriptors as ``tile``-pixel glyphs in a grid of ``columns``
    (default the square root of their count, rounded up), in the stored order, strongest first."""
    tokens, clutter = images.tokens[index].tolist(), images.is_clutter[index].tolist()
    columns = columns or math.ceil(math.sqrt(len(tokens)))
    rows = -(-len(tokens) // columns)
    picture = torch.ones(3, rows * tile, columns * tile)
    for slot, (token, muted) in enumerate(zip(tokens, clutter, strict=True)):
        r, c = divmod(slot, columns)
        picture[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = _glyph(token, tile, muted)
    return picture
