"""Galleries as streams of row blocks.

A gallery may be a tensor, a numpy array or memmap, an h5py dataset (anything with ``shape``, ``dtype`` and
slicing), or any iterable of 2-D blocks. :class:`BlockSource` gives them one interface so that search and
evaluation read each gallery row once, one block at a time, and never hold the whole gallery in memory unless
it already was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np
import torch
from torch import Tensor

from objretrieval._validation import check_finite_values

if TYPE_CHECKING:
    import h5py

#: What search and evaluation accept as a gallery.
GalleryLike: TypeAlias = "Tensor | np.ndarray | h5py.Dataset | Iterable[Tensor | np.ndarray]"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_array_like(x: Any) -> bool:
    return isinstance(x, (Tensor, np.ndarray)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")
    )


class BlockSource:
    """A gallery read as consecutive row blocks ``(offset, block)``.

    Array-likes are sliced ``block_size`` rows at a time (for h5py and memmaps this reads only that slice from
    disk). Iterables are taken block by block as they come. Every block is checked for shape, dtype and finite
    values as it is read, so a bad row is reported with its global index.

    Args:
        source: tensor, numpy array/memmap, h5py dataset, or iterable of 2-D blocks.
        name: argument name used in error messages.
        block_size: rows per block for array-likes.
        check_finite: reject NaN/inf rows.
    """

    def __init__(
        self, source: GalleryLike, name: str = "gallery", block_size: int = 4096, check_finite: bool = True
    ) -> None:
        self.name = name
        self.block_size = block_size
        self.check_finite = check_finite
        self._source: Any = source  # sliced or iterated depending on its kind
        self.is_array = _is_array_like(source)
        self.num_rows: int | None = None
        self.dim: int | None = None
        if self.is_array:
            shape = tuple(cast(Any, source).shape)
            if len(shape) != 2:
                raise ValueError(f"{name} must be 2-D (num_items, dim), got shape {shape}")
            if shape[0] == 0:
                raise ValueError(f"{name} is empty: expected at least one row, got shape {shape}")
            self.num_rows, self.dim = int(shape[0]), int(shape[1])
        elif isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
            raise TypeError(
                f"{name} must be a tensor, a numpy array, an h5py dataset or an iterable of 2-D blocks, "
                f"got {type(source).__name__}"
            )
        self._one_shot = not self.is_array and iter(source) is source  # generators can be read once

    @property
    def tensor(self) -> Tensor | None:
        """The gallery tensor this source slices, or None for other sources (arrays, files, iterables)."""
        return self._source if isinstance(self._source, Tensor) else None

    @property
    def reiterable(self) -> bool:
        return not self._one_shot

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(row_offset, block)`` with ``block`` a (rows, dim) floating tensor."""
        offset = 0
        if self.is_array:
            assert self.num_rows is not None
            for start in range(0, self.num_rows, self.block_size):
                yield start, self._checked(self._source[start : start + self.block_size], start)
            return
        for raw in self._source:
            block = self._checked(raw, offset)
            if block.shape[0] == 0:
                continue
            yield offset, block
            offset += block.shape[0]
        if offset == 0:
            raise ValueError(f"{self.name} is empty: the iterable yielded no rows")
        self.num_rows = offset

    def _checked(self, raw: Any, offset: int) -> Tensor:
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(np.ascontiguousarray(raw))
        if not isinstance(raw, Tensor):
            raise TypeError(f"{self.name} blocks must be tensors or numpy arrays, got {type(raw).__name__}")
        if raw.ndim != 2:
            raise ValueError(
                f"{self.name} blocks must be 2-D (rows, dim), got shape {tuple(raw.shape)} at row {offset}"
            )
        if raw.dtype not in _FLOATS:
            raise TypeError(f"{self.name} must have a floating dtype, got {raw.dtype}")
        if self.dim is None:
            self.dim = int(raw.shape[1])
        elif raw.shape[1] != self.dim:
            raise ValueError(f"{self.name} block at row {offset} has dim {raw.shape[1]}, expected {self.dim}")
        if self.check_finite:
            check_finite_values(raw, self.name, row_offset=offset)
        return raw
