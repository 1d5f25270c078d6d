"""Extract a collection of images into a descriptor file, keeping their global descriptors in memory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval.descriptors.extractors import Extracted
from objretrieval.descriptors.local import HEADER
from objretrieval.descriptors.store import DescriptorStore, PathLike
from objretrieval.progress import show_progress

Box = Sequence[float]


def extract_to_store(
    extractor: Callable[..., Extracted],
    images: Sequence[Any],
    path: PathLike,
    *,
    boxes: Sequence[Box | None] | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Write every image's local descriptor rows to a new descriptor file; return the global descriptors.

    The file is created as :meth:`~objretrieval.descriptors.DescriptorStore.create` does (an existing file at
    ``path`` is replaced), sized from the first image's rows, so any extractor works: a
    :class:`~objretrieval.descriptors.DINOv2LocalExtractor`, a
    :class:`~objretrieval.descriptors.CVNetLocalExtractor` (whose rows hold 1024-d res4 descriptors), with or
    without a detector. Row ``i`` of the file is ``extractor(images[i], box=boxes[i]).rows``.

    Args:
        extractor: called as ``extractor(image, box=box)``, returning :class:`Extracted`.
        images: (3, H, W) tensors (float in [0, 1] or uint8) or PIL images, at least one.
        path: the descriptor file to write (AMES's layout, ``features`` (N, topk, 5 + D)).
        boxes: optional ``(x1, y1, x2, y2)`` crop per image (revisited Oxford/Paris query boxes), None for an
            image not cropped; as many as images.
        progress: a bar over the images; None (the default): only for 10,000 images or more
            (:func:`objretrieval.progress.show_progress`).

    Returns:
        (N, D_g) global descriptors, in image order.

    Raises:
        ValueError: no images, or a different number of boxes than images (before any file is written).
        TypeError: ``images`` or ``boxes`` is not a sequence, or ``progress`` is not a bool or None.
    """
    for name, value in (("images", images), ("boxes", boxes)):
        if value is not None and (isinstance(value, (str, bytes)) or not hasattr(value, "__len__")):
            raise TypeError(f"{name} must be a sequence, got {type(value).__name__}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got none")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(
            f"boxes must hold one box (or None) per image: {len(boxes)} boxes, {len(images)} images"
        )
    show = show_progress(progress, len(images), "images")

    def extracted(i: int) -> Extracted:
        return extractor(images[i], box=None if boxes is None else boxes[i])

    first = extracted(0)  # its rows give the file's topk and descriptor dimension
    topk, width = first.rows.shape
    globals_ = []
    with DescriptorStore.create(path, len(images), topk, width - HEADER) as store:
        for i in tqdm(range(len(images)), disable=not show, desc="extract", unit="image"):
            out = first if i == 0 else extracted(i)
            store.write(i, out.rows[None])
            globals_.append(out.global_descriptor)
    return torch.stack(globals_)
