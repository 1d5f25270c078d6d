"""Local descriptors on disk (h5py), in AMES's file layout, read in batches without loading the file.

``features`` (N, topk, 5 + D) float32 holds one row per descriptor (see :mod:`objretrieval.descriptors.local`),
as the official extraction writes ``{desc}_{query|gallery}_local.hdf5``. A packed-binary store holds 128-bit
codes instead: ``codes`` (N, T, 16) uint8 and ``padding`` (N, T) bool, 800 bytes per image for T = 50.

Extraction can be split over processes: each writes one shard (``DescriptorStore.create(..., shard=...)``, a
contiguous range of the images) and :meth:`DescriptorStore.open_shards` reads the shards as one store, through an
HDF5 virtual dataset (nothing is copied).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import h5py
import numpy as np
import torch
from torch import Tensor

from objretrieval._validation import check_positive_int
from objretrieval.descriptors.local import HEADER, split_rows
from objretrieval.display import SummaryRepr

PathLike = str | os.PathLike[str]

#: Attributes of a shard file: its first image in the whole store, and the whole store's size.
_SHARD_START, _NUM_IMAGES = "shard_start", "num_images"


def _read_sorted(
    dataset: h5py.Dataset, indices: Sequence[int] | np.ndarray | Tensor, limit: int | None
) -> np.ndarray:
    """Rows ``dataset[indices, :limit]`` in the requested order (h5py wants sorted unique indices)."""
    array = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):  # 0.5 would silently read image 0
        raise TypeError(f"indices must be integer image ids, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= dataset.shape[0]):
        raise IndexError(
            f"indices must lie in [0, {dataset.shape[0]}), got min {array.min()}, max {array.max()}"
        )
    if limit is not None:
        check_positive_int(limit, "max_descriptors")
    window = slice(None, limit)
    if array.size and np.array_equal(array, np.arange(array[0], array[0] + array.size)):
        return dataset[
            int(array[0]) : int(array[-1]) + 1, window
        ]  # a block: one slice, not a point selection
    unique, inverse = np.unique(array, return_inverse=True)
    return dataset[unique.tolist(), window][inverse] if unique.size else dataset[[], window]


def _check_range(start: int, count: int, size: int) -> None:
    if start < 0 or start + count > size:
        raise ValueError(f"images {start} .. {start + count} do not fit in a store of {size}")


_Store = TypeVar("_Store", bound="_H5Store")


class _H5Store(SummaryRepr):
    """An open h5py file that must hold the named datasets; a context manager that closes it."""

    def __init__(self, path: PathLike | h5py.File, mode: str, datasets: tuple[str, ...], layout: str) -> None:
        self.file = path if isinstance(path, h5py.File) else h5py.File(os.fspath(path), mode)
        self.path = str(self.file.filename)
        for name in datasets:
            if name not in self.file:
                self.file.close()
                raise KeyError(f"{self.path} has no '{name}' dataset ({layout})")

    def close(self) -> None:
        self.file.close()

    def summary_fields(self) -> dict[str, Any]:
        """What the repr shows: the path, the open mode and the layout; a closed file only its path."""
        if not self.file:  # closed: its datasets can no longer be read
            return {"path": self.path, "closed": True}
        return {"path": self.path, "mode": self.file.mode, **self._sizes()}

    def _sizes(self) -> dict[str, int]:
        """The sizes of the file's datasets."""
        raise NotImplementedError

    def __enter__(self: _Store) -> _Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DescriptorStore(_H5Store):
    """An h5py file of local descriptor rows, ``features`` (N, topk, 5 + D).

    Open an existing file with ``DescriptorStore(path)``; write a new one with :meth:`create`, or one shard of
    it per process and read them together with :meth:`open_shards`. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path: PathLike | h5py.File, mode: str = "r") -> None:
        super().__init__(path, mode, ("features",), "the AMES descriptor layout")
        self.features: h5py.Dataset = self.file["features"]
        if self.features.ndim != 3 or self.features.shape[2] <= HEADER:
            raise ValueError(
                f"{self.path}: 'features' must be (N, topk, {HEADER} + D), got {self.features.shape}"
            )

    @classmethod
    def create(
        cls,
        path: PathLike,
        num_images: int,
        topk: int,
        dim: int,
        *,
        chunked: bool = True,
        compression: str | None = None,
        shard: range | None = None,
    ) -> DescriptorStore:
        """A new file for ``num_images`` images of ``topk`` rows of ``dim``-d descriptors.

        Args:
            chunked: one image per chunk, so that reading a few images touches only their chunks.
            compression: an h5py filter, e.g. ``"gzip"`` or ``"lzf"`` (needs ``chunked``).
            shard: write only these images of the ``num_images`` (a contiguous range, e.g. this rank's
                :func:`~objretrieval.distributed.world.shard_range`): the file holds ``len(shard)`` images,
                written at positions ``0 .. len(shard)`` (image ``shard[i]`` at position ``i``), and records
                which ones they are for :meth:`open_shards`.
        """
        if compression is not None and not chunked:
            raise ValueError("compression needs a chunked dataset (chunked=True)")
        num_images = check_positive_int(num_images, "num_images", minimum=0)
        if shard is not None and (
            not isinstance(shard, range)
            or shard.step != 1
            or not 0 <= shard.start <= shard.stop <= num_images
        ):
            raise ValueError(f"shard must be a contiguous range within range(0, {num_images}), got {shard!r}")
        images = range(num_images) if shard is None else shard
        with h5py.File(os.fspath(path), "w") as f:
            features = f.create_dataset(
                "features",
                shape=(len(images), topk, HEADER + dim),
                dtype=np.float32,
                chunks=(1, topk, HEADER + dim) if chunked and len(images) else None,
                compression=compression,
            )
            if shard is not None:
                features.attrs[_SHARD_START], features.attrs[_NUM_IMAGES] = shard.start, num_images
        return cls(path, "r+")

    @classmethod
    def open_shards(cls, paths: Sequence[PathLike]) -> DescriptorStore:
        """The shards written by ``create(..., shard=...)`` read as one store of all their images, in order.

        The shards may come in any order; nothing is copied (an in-memory HDF5 virtual dataset maps each
        image to its shard file), and reads go to the shard files, which must stay in place while it is open.

        Raises:
            FileNotFoundError: a shard file does not exist.
            ValueError: a file is not a shard, the shards disagree on the store's size, ``topk``, descriptor
                dimension or dtype, they overlap or leave images out (a missing shard), or a (chunked) shard
                has images never written (its extraction stopped early).
        """
        if isinstance(paths, (str, os.PathLike)) or not paths:
            raise ValueError("paths must be a non-empty list of shard files")
        shards = sorted((_read_shard(p) for p in paths), key=lambda s: (s[1].start, s[1].stop))
        path, _, shape, dtype, total = shards[0]
        end = 0
        for other, images, other_shape, other_dtype, other_total in shards:
            if (other_shape, other_dtype, other_total) != (shape, dtype, total):
                raise ValueError(
                    f"shards disagree: {path} holds {total} images of {shape} {dtype} rows, "
                    f"{other} {other_total} images of {other_shape} {other_dtype} rows"
                )
            if len(images) and images.start != end:  # (an empty shard holds nothing to place)
                problem = "overlap" if images.start < end else f"leave images {end} .. {images.start - 1} out"
                raise ValueError(f"shards {problem}: {other} starts at image {images.start}, not {end}")
            end = images.stop
        if end != total:
            raise ValueError(f"shards leave images {end} .. {total - 1} out (of {total}): a shard is missing")
        layout = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype)
        for source, images, *_ in shards:
            if len(images):  # a rank with no images writes an empty shard
                layout[images.start : images.stop] = h5py.VirtualSource(
                    source, "features", (len(images), *shape)
                )
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.create_virtual_dataset("features", layout)
        # opened read-only from memory, so HDF5 opens the shards read-only too (other processes may read them)
        store = cls(h5py.File(h5py.h5f.open_file_image(image.getvalue())))
        store.path = f"{len(shards)} shards ({path}, ...)"  # what error messages call it
        return store

    @property
    def images(self) -> range:
        """The image ids this file holds: ``range(len(self))``, or its share of the store for a shard."""
        start = int(self.features.attrs.get(_SHARD_START, 0))
        return range(start, start + len(self))

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def _sizes(self) -> dict[str, int]:
        """``images``, ``topk`` rows each and descriptor ``dim``."""
        return {"images": len(self), "topk": self.topk, "dim": self.dim}

    @property
    def topk(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2]) - HEADER

    def write(self, start: int, rows: Tensor | np.ndarray) -> None:
        """Write (n, topk, 5 + D) rows for images ``start .. start + n``."""
        array = rows.detach().cpu().numpy() if isinstance(rows, Tensor) else np.asarray(rows)
        if array.ndim != 3 or array.shape[1:] != self.features.shape[1:]:
            raise ValueError(f"rows must have shape (n, {self.topk}, {HEADER + self.dim}), got {array.shape}")
        _check_range(start, array.shape[0], len(self))
        self.features[start : start + array.shape[0]] = array

    def read_rows(self, indices: Sequence[int] | np.ndarray, max_descriptors: int | None = None) -> Tensor:
        """(n, T, 5 + D) rows of the given images, in the order asked, with the first ``max_descriptors`` rows."""
        return torch.from_numpy(_read_sorted(self.features, indices, max_descriptors))

    def read(
        self, indices: Sequence[int] | np.ndarray, max_descriptors: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Descriptors (n, T, D) and padding mask (n, T) (True = padding) of the given images.

        Rows are sorted by weight, so ``max_descriptors`` keeps each image's strongest descriptors.
        """
        return split_rows(self.read_rows(indices, max_descriptors))

    def blocks(
        self, block_size: int = 256, max_descriptors: int | None = None
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(start, descriptors, padding)`` for consecutive blocks of images."""
        block_size = check_positive_int(block_size, "block_size")
        if max_descriptors is not None:
            check_positive_int(max_descriptors, "max_descriptors")
        for start in range(0, len(self), block_size):
            rows = torch.from_numpy(self.features[start : start + block_size, :max_descriptors])
            yield (start, *split_rows(rows))


def _read_shard(path: PathLike) -> tuple[str, range, tuple[int, int], np.dtype, int]:
    """A shard's absolute path, images, row shape, dtype and store size, after checking it is a whole shard."""
    path = os.path.abspath(os.fspath(path))  # a virtual dataset resolves relative paths elsewhere
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard {path} does not exist (its process did not write it?)")
    with DescriptorStore(path) as store:
        attrs = store.features.attrs
        if _SHARD_START not in attrs or _NUM_IMAGES not in attrs:
            raise ValueError(
                f"{path} is not a shard: write shards with DescriptorStore.create(..., shard=...)"
            )
        features = store.features
        if features.chunks == (1, *features.shape[1:]) and len(store):
            written = features.id.get_num_chunks()  # one chunk per image, allocated when first written
            if written != len(store):
                raise ValueError(
                    f"shard {path} has {written} of its {len(store)} images written: its extraction stopped early"
                )
        elif features.chunks is None and len(store) and features.id.get_storage_size() == 0:
            # contiguous storage is allocated on the first write: none means the shard would read as zeros
            raise ValueError(
                f"shard {path} has none of its {len(store)} images written: its extraction failed"
            )
        shape = (int(features.shape[1]), int(features.shape[2]))
        return path, store.images, shape, features.dtype, int(attrs[_NUM_IMAGES])


class BinaryCodeStore(_H5Store):
    """An h5py file of packed binary codes: ``codes`` (N, T, bits / 8) uint8 and ``padding`` (N, T) bool."""

    def __init__(self, path: PathLike, mode: str = "r") -> None:
        super().__init__(path, mode, ("codes", "padding"), "a packed binary code store")
        self.codes: h5py.Dataset = self.file["codes"]
        self.padding: h5py.Dataset = self.file["padding"]

    @classmethod
    def create(
        cls, path: PathLike, num_images: int, num_descriptors: int, bits: int = 128
    ) -> BinaryCodeStore:
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {bits}")
        with h5py.File(os.fspath(path), "w") as f:
            f.create_dataset(
                "codes",
                shape=(num_images, num_descriptors, bits // 8),
                dtype=np.uint8,
                chunks=(1, num_descriptors, bits // 8),
            )
            f.create_dataset(
                "padding", shape=(num_images, num_descriptors), dtype=bool, chunks=(1, num_descriptors)
            )
        return cls(path, "r+")

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def _sizes(self) -> dict[str, int]:
        """``images``, ``descriptors`` each and ``bits`` per descriptor."""
        return {
            "images": len(self),
            "descriptors": int(self.codes.shape[1]),
            "bits": 8 * int(self.codes.shape[2]),
        }

    def write(self, start: int, codes: Tensor, padding: Tensor) -> None:
        """Write (n, T, bits / 8) uint8 codes and their (n, T) padding mask from image ``start`` on."""
        if codes.dtype != torch.uint8 or tuple(codes.shape[1:]) != self.codes.shape[1:]:
            raise ValueError(
                f"codes must be uint8 of shape (n, {', '.join(map(str, self.codes.shape[1:]))}), "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        if padding.shape != codes.shape[:2]:
            raise ValueError(f"padding must have shape {tuple(codes.shape[:2])}, got {tuple(padding.shape)}")
        _check_range(start, codes.shape[0], len(self))
        self.codes[start : start + codes.shape[0]] = codes.cpu().numpy()
        self.padding[start : start + padding.shape[0]] = padding.cpu().numpy()

    def read(self, indices: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        """Packed codes (n, T, bits / 8) and padding (n, T) of the given images, in the order asked."""
        return (
            torch.from_numpy(_read_sorted(self.codes, indices, None)),
            torch.from_numpy(_read_sorted(self.padding, indices, None)),
        )

    @property
    def bytes_per_image(self) -> int:
        """Storage of one image's codes (the padding mask aside)."""
        return int(np.prod(self.codes.shape[1:]))
