"""Objects as sets of images: a folder-per-object dataset, the choice of images per set, padding and masks.

``root/<object>/*.jpg`` holds the images of one object. Labels come from the folder *name* through
``class_to_idx``, so a query split and a gallery split of the same objects get the same labels whatever
order the filesystem lists them in (the official code enumerates ``os.listdir``, which only lines up by
luck).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from objretrieval._validation import check_choice, check_positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def folder_class_index(*roots: str | os.PathLike[str]) -> dict[str, int]:
    """``{folder name: label}`` over the object folders of every root, sorted by name."""
    names: set[str] = set()
    for root in roots:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"image-set root not found: {root}")
        names.update(p.name for p in Path(root).iterdir() if p.is_dir())
    return {name: i for i, name in enumerate(sorted(names))}


@dataclass(frozen=True)
class SetSelection:
    """Which images of an object form its set, and in what order.

    Args:
        images_per_set: k, the number of images per set (4 in MILE).
        mode: "first" takes the first k by file name (MILE's training default), "random" draws k without
            replacement (MILE's evaluation), "all" takes every image (then k only caps nothing).
        pad: "duplicate" fills a set with fewer than k images by random duplicates (MILE), "none" keeps it
            short (batches are then padded and masked by :func:`collate_image_sets`).
        reverse: reverse the order after selection (MILE's ``input_order=-1``). The set embedding depends on
            the order, so keep this fixed between indexing and querying.
        seed: draws depend only on (seed, epoch, object index), never on the DataLoader worker.
    """

    images_per_set: int = 4
    mode: str = "first"
    pad: str = "duplicate"
    reverse: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.images_per_set, "images_per_set")
        check_choice(self.mode, "mode", ("first", "random", "all"))
        check_choice(self.pad, "pad", ("duplicate", "none"))

    def __call__(self, files: Sequence[str], index: int, epoch: int = 0) -> list[str]:
        if not files:
            raise ValueError(f"object {index} has no images")
        rng = np.random.default_rng((self.seed, epoch, index))
        k = self.images_per_set
        ordered = sorted(files, key=os.path.basename)
        if self.mode == "all":
            chosen = ordered
        elif self.mode == "first":
            chosen = ordered[:k]
        else:
            chosen = [ordered[i] for i in rng.choice(len(ordered), size=min(k, len(ordered)), replace=False)]
        if self.pad == "duplicate" and self.mode != "all" and len(chosen) < k:
            chosen = chosen + [chosen[i] for i in rng.integers(0, len(chosen), size=k - len(chosen))]
        return chosen[::-1] if self.reverse else chosen


class ImageSet(NamedTuple):
    """One object: its transformed images (in feed order), label and folder name."""

    images: list[Any]
    label: int
    name: str


class ImageSetDataset(Dataset[ImageSet]):
    """Objects stored as ``root/<object>/<image>``; item i is the :class:`ImageSet` of object i.

    Args:
        root: folder of object folders.
        selection: which images form each set (:class:`SetSelection`).
        transform: applied to each PIL image (RGB); e.g. :func:`~objretrieval.data.set_eval_transform` or
            :class:`~objretrieval.data.DINOMultiCrop`.
        class_to_idx: folder name -> label (see :func:`folder_class_index`); default: sorted folder names
            of ``root``. Objects missing from it raise.
        extensions: image file suffixes to read (case-insensitive).

    Images are converted to RGB (the official code silently drops non-RGB images and may substitute another
    object); objects without images are an error at construction.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        selection: SetSelection | None = None,
        transform: Callable[[Any], Any] | None = None,
        *,
        class_to_idx: Mapping[str, int] | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        self.selection = selection or SetSelection()
        self.transform = transform
        self.class_to_idx = dict(class_to_idx) if class_to_idx is not None else folder_class_index(root)
        exts = tuple(e.lower() for e in extensions)
        self.objects: list[tuple[str, list[str]]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(str(f) for f in folder.iterdir() if f.suffix.lower() in exts)
            if not files:
                raise ValueError(f"object folder {folder} has no images with extensions {exts}")
            if folder.name not in self.class_to_idx:
                raise KeyError(f"object folder {folder.name!r} is not in class_to_idx")
            self.objects.append((folder.name, files))
        if not self.objects:
            raise ValueError(f"no object folders under {self.root}")
        self.epoch = 0

    @property
    def labels(self) -> Tensor:
        """(num_objects,) int64 labels in item order."""
        return torch.tensor([self.class_to_idx[name] for name, _ in self.objects], dtype=torch.int64)

    def set_epoch(self, epoch: int) -> None:
        """Draw different random sets each epoch (for ``mode="random"`` or duplicate padding)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> ImageSet:
        from PIL import Image

        name, files = self.objects[index]
        images = []
        for path in self.selection(files, index, self.epoch):
            with Image.open(path) as img:
                rgb = img.convert("RGB")
            images.append(self.transform(rgb) if self.transform is not None else rgb)
        return ImageSet(images, self.class_to_idx[name], name)


class ImageSetBatch(NamedTuple):
    """A padded batch of sets: images (B, N, 3, H, W), mask (B, N) True at padding (or None), labels (B,)."""

    images: Tensor
    mask: Tensor | None
    labels: Tensor


def pad_sets(sets: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Stack sets of (n_i, ...) tensors into (B, max n_i, ...) with a (B, max n_i) padding mask (None if
    no set is short)."""
    if not sets:
        raise ValueError("sets is empty")
    longest = max(s.shape[0] for s in sets)
    out = sets[0].new_zeros(len(sets), longest, *sets[0].shape[1:])
    mask = torch.ones(len(sets), longest, dtype=torch.bool)
    for i, s in enumerate(sets):
        if s.shape[1:] != sets[0].shape[1:]:
            raise ValueError(
                f"set {i} has items of shape {tuple(s.shape[1:])}, set 0 {tuple(sets[0].shape[1:])}"
            )
        out[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = False
    return out, (mask if bool(mask.any()) else None)


def collate_image_sets(batch: Sequence[ImageSet]) -> ImageSetBatch:
    """DataLoader ``collate_fn`` for sets of tensor images: pads short sets and returns their mask."""
    images, mask = pad_sets([torch.stack(list(item.images)) for item in batch])
    return ImageSetBatch(images, mask, torch.tensor([item.label for item in batch], dtype=torch.int64))


class MultiCropSetBatch(NamedTuple):
    """Multi-crop views of B objects with K images each.

    Attributes:
        global_crops: (B, K, G, 3, H, W) the G global crops of every image (G = 2 in DINO).
        local_crops: (B, K, L, 3, h, w) local crops, or None.
        mask: (B, K) bool, True at padded images, or None.
    """

    global_crops: Tensor
    local_crops: Tensor | None = None
    mask: Tensor | None = None


def collate_multicrop_sets(batch: Sequence[ImageSet]) -> tuple[MultiCropSetBatch, Tensor]:
    """DataLoader ``collate_fn`` for sets transformed by :class:`~objretrieval.data.DINOMultiCrop`.

    Returns the :class:`MultiCropSetBatch` (short sets padded and masked) and the (B,) labels.
    """
    global_sets, local_sets = [], []
    for item in batch:
        global_sets.append(torch.stack([torch.stack(list(g)) for g, _ in item.images]))
        locals_ = [list(loc) for _, loc in item.images]
        if any(locals_):
            local_sets.append(torch.stack([torch.stack(loc) for loc in locals_]))
    global_crops, mask = pad_sets(global_sets)
    local_crops = pad_sets(local_sets)[0] if local_sets else None
    labels = torch.tensor([item.label for item in batch], dtype=torch.int64)
    return MultiCropSetBatch(global_crops, local_crops, mask), labels
