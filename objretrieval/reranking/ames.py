"""Scoring queries against database images with AMES, from any container of local descriptors.

Queries and database images may come as ``(descriptors, padding)`` tensors, a :class:`DescriptorStore`, packed
codes in a :class:`BinaryCodeStore` (binarized models), or a :class:`DatabaseCache` projected once.
:func:`_source` turns each into one reader; everything downstream reads images by id through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval._validation import (
    check_finite_values,
    check_not_all_padded,
    check_padding_mask,
    check_positive_int,
)
from objretrieval.descriptors.store import BinaryCodeStore, DescriptorStore, PathLike
from objretrieval.display import ConfigRepr, SummaryRepr
from objretrieval.distributed.world import Group, all_gather_uneven, is_distributed
from objretrieval.models.ames import AMES, ProjectedDescriptors
from objretrieval.progress import show_progress
from objretrieval.search.pairwise import _my_share, _on_every_rank, check_pairs

#: What an image source holds: raw local descriptors, packed binary codes, or projected (cached) tokens.
Kind = Literal["descriptors", "codes", "tokens"]
LocalDescriptors = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class _Source:
    """Images read by id: ``read(ids) -> (data (n, T, ...), padding (n, T) bool)``, where the source keeps them."""

    kind: Kind
    size: int
    name: str
    read_ids: Callable[[np.ndarray], tuple[Tensor, Tensor]]

    def read(self, ids: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """The images ``ids``, checked: finite values and at least one real descriptor each."""
        array = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids)
        if array.size and (array.min() < 0 or array.max() >= self.size):
            raise IndexError(
                f"{self.name} ids must lie in [0, {self.size}), got {array.min()} .. {array.max()}"
            )
        data, padding = self.read_ids(array.astype(np.int64))
        label = _label(self.name, array)
        if data.is_floating_point():
            check_finite_values(data, label)
        check_not_all_padded(padding, label, "image")
        return data, padding


def _label(name: str, ids: np.ndarray) -> str:
    """``name`` and which images a read covers, so errors name the image ids."""
    if ids.size == 1:
        return f"{name} (image {int(ids[0])})"
    if ids.size and np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)):
        return f"{name} (images {int(ids[0])} .. {int(ids[-1])})"
    return f"{name} (images {ids.tolist()})"


def _source(source: Any, name: str, max_descriptors: int) -> _Source:
    """The one reader over every accepted container (the only place that dispatches on its type)."""
    if isinstance(source, DatabaseCache):
        data = source.codes if source.codes is not None else source.tokens
        assert data is not None
        kind: Kind = "codes" if source.codes is not None else "tokens"
        padding = ~source.keep
        return _Source(kind, len(source), name, lambda ids: (data[ids], padding[ids]))
    if isinstance(source, BinaryCodeStore):
        return _Source("codes", len(source), name, source.read)
    if isinstance(source, DescriptorStore):
        return _Source("descriptors", len(source), name, lambda ids: source.read(ids, max_descriptors))
    if isinstance(source, tuple) and len(source) == 2:
        descriptors, padding = source
        if (
            not isinstance(descriptors, Tensor)
            or descriptors.ndim != 3
            or not descriptors.is_floating_point()
        ):
            got = (
                f"{descriptors.dtype} {tuple(descriptors.shape)}"
                if isinstance(descriptors, Tensor)
                else (type(descriptors).__name__)
            )
            raise ValueError(f"{name} descriptors must be a floating (N, T, D) tensor, got {got}")
        padding = check_padding_mask(
            padding, f"{name} padding", tuple(descriptors.shape[:2]), descriptors.device
        )
        descriptors, padding = descriptors[:, :max_descriptors], padding[:, :max_descriptors]
        return _Source(
            "descriptors",
            descriptors.shape[0],
            name,
            lambda ids: (descriptors[ids], padding[ids]),
        )
    raise TypeError(
        f"{name} must be (descriptors, padding) tensors, a DescriptorStore, a BinaryCodeStore or a DatabaseCache, "
        f"got {type(source).__name__}"
    )


def _project(
    model: AMES, kind: Kind, data: Tensor, padding: Tensor, device: torch.device
) -> ProjectedDescriptors:
    """Database tokens from what a source holds."""
    data, padding = data.to(device), padding.to(device)
    if kind == "codes":
        return model.project_codes(data, ~padding)
    if kind == "tokens":
        return ProjectedDescriptors(data, ~padding)
    return model.project_database(data, padding)


def _check_matches(model: AMES, source: _Source, what: str) -> None:
    """A binarized model reads codes (or descriptors), a full-precision one tokens (or descriptors)."""
    if source.kind == "codes" and not model.binarized:
        raise ValueError(
            f"{what} holds packed binary codes, which need a binarized model (the *_dist builders)"
        )
    if source.kind == "tokens" and model.binarized:
        raise ValueError(
            f"{what} holds full-precision tokens, but the model is binarized: build the cache with this model"
        )


def _project_blocks(
    model: AMES, source: _Source, starts: range, block_size: int, device: torch.device, show: bool
) -> tuple[Tensor, Tensor]:
    """The database side of the blocks of ``block_size`` images beginning at ``starts``, on the CPU: packed
    codes (binarized models) or float16 tokens, and their (n, T) keep mask."""
    parts, keeps = [], []
    for start in tqdm(starts, disable=not show, desc="projecting", unit="block"):
        local, pad = source.read(np.arange(start, min(start + block_size, source.size)))
        local, pad = local.to(device), pad.to(device)
        if model.binarized:
            data, keep = model.binary_codes(local, pad)
        else:
            projected = model.project_database(local, pad)
            data, keep = projected.tokens, projected.keep
        parts.append(data.cpu())
        keeps.append(keep.cpu())
    return torch.cat(parts), torch.cat(keeps)


@dataclass(frozen=True, repr=False)
class DatabaseCache(SummaryRepr):
    """Every database image projected once for AMES: float16 tokens, or packed codes for binarized models.

    Attributes:
        keep: (N, T) bool, True for real descriptors.
        tokens: (N, T, d) float16 tokens (full-precision models; the official evaluation rounds database
            tokens to float16, so nothing is lost).
        codes: (N, T, bits / 8) uint8 packed codes (binarized models).
    """

    keep: Tensor
    tokens: Tensor | None = None
    codes: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.codes is None):
            raise ValueError("a DatabaseCache holds either tokens or codes (exactly one of them)")
        data = self.codes if self.codes is not None else self.tokens
        assert data is not None
        if not isinstance(self.keep, Tensor) or self.keep.dtype != torch.bool:
            got = self.keep.dtype if isinstance(self.keep, Tensor) else type(self.keep).__name__
            raise TypeError(f"keep must be a bool tensor (True for real descriptors), got {got}")
        if data.ndim != 3 or tuple(data.shape[:2]) != tuple(self.keep.shape):
            raise ValueError(f"keep must be (N, T) = {tuple(data.shape[:2])}, got {tuple(self.keep.shape)}")

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: AMES,
        database: DescriptorStore | LocalDescriptors,
        *,
        max_descriptors: int = 50,
        block_size: int = 1024,
        device: torch.device | str | None = None,
        progress: bool | None = None,
        group: Group | None = None,
    ) -> DatabaseCache:
        """Project a database streamed in blocks from a :class:`DescriptorStore` or (descriptors, padding).

        Args:
            model: the :class:`~objretrieval.models.AMES` whose database side is cached (packed codes if it is
                binarized, float16 tokens otherwise).
            database: a :class:`DescriptorStore`, or (descriptors (N, T, Dl), padding (N, T)) tensors.
            max_descriptors: descriptors kept per image (the first ones: stores sort them by weight).
            block_size: images projected per call.
            device: where to project; default the model's device. The cache is kept on the CPU.
            progress: a bar over the blocks (with ``group``, each rank's bar over its own share); None (the
                default): for databases of 10,000 images or more.
            group: share the projection over this process group's ranks (e.g. ``torch.distributed.group.WORLD``):
                each rank projects a contiguous run of the blocks one process would project, and every rank
                receives the whole cache, identical to one process's. Every rank must pass the same model and
                database (the number of images is checked), ``max_descriptors`` and ``block_size``. None: this
                process projects every block.

        Raises:
            ValueError: on NaN/inf descriptors or an image without any real descriptor, naming the image (with
                ``group``, on every rank, naming the rank that read it), on an empty database, and when ranks
                pass different arguments.
            RuntimeError: if ``group`` is given but ``torch.distributed`` is not initialised.
        """
        if group is not None and not is_distributed():
            raise RuntimeError(
                "DatabaseCache.build(group=...) needs torch.distributed: call init_process_group first"
            )

        def check() -> tuple[tuple[_Source, int], Hashable]:
            size = check_positive_int(max_descriptors, "max_descriptors")
            block = check_positive_int(block_size, "block_size")
            source = _source(database, "database", size)
            if source.kind != "descriptors":
                raise TypeError(
                    "DatabaseCache.build projects local descriptors; use from_code_store for packed codes"
                )
            if source.size == 0:
                raise ValueError("database holds no images: there is nothing to cache")
            settings = ("images", source.size), ("max_descriptors", size), ("block_size", block)
            return (source, block), (*settings, ("binarized", model.binarized))

        source, block = _on_every_rank(check, "DatabaseCache.build", group)
        model.eval()
        device = torch.device(device) if device is not None else next(model.parameters()).device
        mine = _my_share(range(0, source.size, block), group)  # the first image of each block of this rank
        show = show_progress(progress, source.size, "images")

        # a rank left without blocks (fewer blocks than ranks) projects one empty block: the exchange checks
        # the layout (T, width, dtype) every rank sends
        starts = mine or range(source.size, source.size + 1)

        def project_mine() -> tuple[tuple[Tensor, Tensor], Hashable]:
            return _project_blocks(model, source, starts, block, device, show), ()

        data, keep = _on_every_rank(project_mine, "DatabaseCache.build", group)
        if group is not None:  # every rank's blocks, in rank order: all the blocks, in order
            data = all_gather_uneven(data, group, "database codes" if model.binarized else "tokens")[0]
            keep = all_gather_uneven(keep, group, "keep masks")[0]
        return cls(keep, codes=data) if model.binarized else cls(keep, tokens=data)

    @classmethod
    def from_code_store(cls, store: BinaryCodeStore) -> DatabaseCache:
        """Load every packed code of a :class:`BinaryCodeStore` (800 bytes per image at 50 x 128 bits)."""
        codes, padding = _source(store, "store", 0).read(np.arange(len(store)))
        return cls(~padding, codes=codes)

    def save_codes(self, path: PathLike) -> None:
        """Write the packed codes of a binarized model's cache to a :class:`BinaryCodeStore` file."""
        if self.codes is None:
            raise ValueError("save_codes needs a cache built with a binarized model (packed codes)")
        with BinaryCodeStore.create(path, len(self), self.codes.shape[1], 8 * self.codes.shape[2]) as store:
            store.write(0, self.codes, ~self.keep)

    def __len__(self) -> int:
        return self.keep.shape[0]

    def summary_fields(self) -> dict[str, Any]:
        """What the repr shows: ``DatabaseCache(images=5000, descriptors=50, binarized=True, bytes_per_image=800)``."""
        return {
            "images": len(self),
            "descriptors": self.keep.shape[1],
            "binarized": self.codes is not None,
            "bytes_per_image": self.bytes_per_image,
        }

    @property
    def bytes_per_image(self) -> int:
        """Bytes of one image's tokens or codes (the padding mask aside)."""
        data = self.codes if self.codes is not None else self.tokens
        assert data is not None
        return int(data[0].numel() * data.element_size())


class AMESScorer(ConfigRepr):
    """Scores queries against database images with AMES: a :class:`~objretrieval.search.PairwiseScorer`.

    Use it with :func:`rerank_revisited`, :func:`score_shortlist`, :func:`~objretrieval.search.pairwise_knn` or
    :meth:`RetrievalEvaluator.from_scorer <objretrieval.metrics.RetrievalEvaluator.from_scorer>`. The pairs of
    one query are scored together: the query is projected once and scored against its database images
    ``batch_size`` at a time in one call, from a :class:`DatabaseCache` (database projected once) or straight
    from descriptors or codes. On CUDA the model runs under autocast. Across processes, ``score_shortlist``,
    ``pairwise_knn`` and ``from_scorer`` share the queries out with ``group=``, every rank holding the same
    scorer (the same weights and images, e.g. every rank's shard read by :meth:`DescriptorStore.open_shards`).

    Args:
        model: an :class:`~objretrieval.models.AMES`.
        queries: a :class:`DescriptorStore` of query descriptors, or (descriptors (Q, Tq, Dl), padding (Q, Tq)).
        database: a :class:`DatabaseCache`; a :class:`DescriptorStore` or (descriptors, padding) tensors,
            projected as candidates come; or a :class:`BinaryCodeStore` of packed codes (binarized models),
            read as candidates come.
        query_descriptors: descriptors per query (600 in the paper).
        database_descriptors: descriptors per database image (50), when not cached.
        batch_size: candidates scored per call (memory grows with it; on a CPU 16 is already as fast as more).
        device: where to run; default the model's device.
        autocast: run under autocast with ``amp_dtype``. ``None`` (default): on CUDA only; ``True``: on any
            device (on CPUs with bfloat16 support use ``amp_dtype=torch.bfloat16``); ``False``: never, and an
            enclosing autocast region is left in effect.
        amp_dtype: the autocast dtype, ``torch.float16`` or ``torch.bfloat16``.

    Raises:
        ValueError: when the database does not suit the model (packed codes for a full-precision model, a
            full-precision cache for a binarized one), and, as images are read, on NaN/inf descriptors or an
            image that is all padding (naming it).
    """

    #: the images are data, not configuration
    config_attributes: ClassVar[dict[str, str | None]] = {"queries": None, "database": None}

    def __init__(
        self,
        model: AMES,
        queries: DescriptorStore | LocalDescriptors,
        database: DatabaseCache | DescriptorStore | BinaryCodeStore | LocalDescriptors,
        *,
        query_descriptors: int = 600,
        database_descriptors: int = 50,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        autocast: bool | None = None,
        amp_dtype: torch.dtype = torch.float16,
    ) -> None:
        if amp_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be torch.float16 or torch.bfloat16, got {amp_dtype}")
        self.query_descriptors = check_positive_int(query_descriptors, "query_descriptors")
        self.database_descriptors = check_positive_int(database_descriptors, "database_descriptors")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.queries = _source(queries, "queries", self.query_descriptors)
        if self.queries.kind != "descriptors":
            raise TypeError(
                "queries must be local descriptors: (descriptors, padding) tensors or a DescriptorStore"
            )
        self.database = _source(database, "database", self.database_descriptors)
        _check_matches(model, self.database, f"database ({type(database).__name__})")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast = self.device.type == "cuda" if autocast is None else autocast
        self.amp_dtype = amp_dtype
        self._query: tuple[int, ProjectedDescriptors] | None = None

    @property
    def num_queries(self) -> int:
        return self.queries.size

    @property
    def num_gallery(self) -> int:
        return self.database.size

    def _project_query(self, q: int) -> ProjectedDescriptors:
        if self._query is None or self._query[0] != q:  # consecutive calls for one query reuse its projection
            local, pad = self.queries.read(np.array([q]))
            self._query = (q, self.model.project_query(local.to(self.device), pad.to(self.device)))
        return self._query[1]

    def _amp(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def score_pairs(self, query_ids: Tensor, gallery_ids: Tensor) -> Tensor:
        """(P,) float32 logits of the pairs ``(query_ids[i], gallery_ids[i])``, on :attr:`device`.

        Consecutive pairs of one query share its projection; give a query's pairs together.
        """
        query_ids, gallery_ids = check_pairs(self, query_ids, gallery_ids)
        out = torch.empty(len(query_ids), device=self.device)
        _, counts = torch.unique_consecutive(query_ids, return_counts=True)
        start = 0
        with self._amp():
            for count in counts.tolist():
                query = self._project_query(int(query_ids[start]))
                for i in range(start, start + count, self.batch_size):
                    ids = gallery_ids[i : min(i + self.batch_size, start + count)]
                    database = _project(self.model, self.database.kind, *self.database.read(ids), self.device)
                    out[i : i + len(ids)] = self.model.score(query, database).float()
                start += count
        return out
