"""faiss as an optional kNN backend: exact flat search, or IVF / HNSW for large galleries.

:class:`FaissOptions` holds the backend's settings. The gallery is streamed into the index block by block
(IVF trains on the first ``train_size`` rows), queries are searched in one call, and results are returned in
objretrieval's conventions: internal scores higher is better, rows sorted by (score, index). faiss does not
promise which of several items tied at the k-th place it returns; the torch backend does.

Approximate indexes may find fewer than ``k`` items for a query (an IVF query whose probed lists hold too few
items). Those slots are missing: index -1 and the worst possible score, so they always rank last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval._validation import check_positive_int
from objretrieval.search.scoring import Metric, Prepared, prepare
from objretrieval.search.sources import BlockSource
from objretrieval.search.topk import sort_by_score_then_index


@dataclass(frozen=True)
class FaissOptions:
    """Options of the faiss backend of :func:`~objretrieval.search.knn` (``backend="faiss"``).

    Attributes:
        index: ``"flat"`` (exact ``IndexFlat``), ``"ivf"`` (``IVF<nlist>,Flat`` with nlist = 4 sqrt(N)),
            ``"hnsw"`` (``HNSW32,Flat``) or any ``faiss.index_factory`` string such as ``"IVF1024,PQ64"``
            (an invalid one raises a ValueError when the index is built).
        nprobe: inverted lists probed per query; only for IVF indexes (faiss's default is 1).
        ef_search: HNSW search depth; only for HNSW indexes (faiss's default is 16).
        train_size: gallery rows used to train indexes that need training (IVF, PQ, SQ).

    Raises:
        TypeError: if ``index`` is not a string or a number is not an int.
        ValueError: on an empty ``index``, a non-positive number, or ``nprobe``/``ef_search`` given for an index
            that has no such parameter (it would be ignored).
    """

    index: str = "flat"
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int = 100_000

    def __post_init__(self) -> None:
        if not isinstance(self.index, str):
            raise TypeError(
                "FaissOptions.index must be a string: 'flat', 'ivf', 'hnsw' or a faiss factory string, "
                f"got {type(self.index).__name__}"
            )
        if not self.index.strip():
            raise ValueError("FaissOptions.index must not be empty")
        check_positive_int(self.train_size, "FaissOptions.train_size")
        if self.nprobe is not None:
            check_positive_int(self.nprobe, "FaissOptions.nprobe")
            if not self.is_ivf:
                raise ValueError(
                    f"FaissOptions.nprobe applies to IVF indexes only, got index={self.index!r}; "
                    "use index='ivf' or a factory string such as 'IVF1024,Flat'"
                )
        if self.ef_search is not None:
            check_positive_int(self.ef_search, "FaissOptions.ef_search")
            if not self.is_hnsw:
                raise ValueError(
                    f"FaissOptions.ef_search applies to HNSW indexes only, got index={self.index!r}; "
                    "use index='hnsw' or a factory string such as 'HNSW32,Flat'"
                )

    @property
    def is_ivf(self) -> bool:
        """Whether the index has inverted lists (``nprobe`` applies)."""
        return self.index == "ivf" or "IVF" in self.index

    @property
    def is_hnsw(self) -> bool:
        """Whether the index is (or is quantised by) an HNSW graph (``ef_search`` applies)."""
        return self.index == "hnsw" or "HNSW" in self.index


def resolve_faiss_options(backend: str, options: FaissOptions | None) -> FaissOptions | None:
    """The faiss options a search runs with: ``options`` (default ``FaissOptions()``) for the faiss backend.

    Raises:
        TypeError: if ``options`` is not a :class:`FaissOptions`.
        ValueError: if ``options`` is given with another backend, where it would be ignored.
    """
    if options is not None and not isinstance(options, FaissOptions):
        raise TypeError(f"faiss must be a FaissOptions or None, got {type(options).__name__}")
    if backend != "faiss":
        if options is not None:
            raise ValueError(
                f"faiss options were given but backend={backend!r}; pass backend='faiss' to use them"
            )
        return None
    return options if options is not None else FaissOptions()


def _factory_string(index: str, num_rows: int | None) -> str:
    if index == "flat":
        return "Flat"
    if index == "hnsw":
        return "HNSW32,Flat"
    if index == "ivf":
        if num_rows is None:
            raise ValueError(
                "index='ivf' needs the gallery size to choose nlist; pass a faiss factory string such as "
                "'IVF1024,Flat' when the gallery is an iterable of blocks"
            )
        nlist = max(1, min(65536, int(4 * math.sqrt(num_rows))))
        return f"IVF{nlist},Flat"
    return index


def faiss_search(
    queries: Tensor,
    gallery: BlockSource,
    k: int,
    metric: Metric,
    *,
    exclude: Tensor | None,
    options: FaissOptions,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Return internal ``(scores, indices)`` of shape (Q, k) on the CPU.

    Missing results (fewer than ``k`` found) have index -1 and internal score -inf, so they sort last.
    """
    import faiss  # imported lazily: faiss is heavy and only needed for this backend

    cpu = torch.device("cpu")
    q = prepare(queries, metric, cpu)
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    blocks = gallery.blocks()

    def as_numpy(p: Prepared) -> np.ndarray:
        return np.ascontiguousarray(p.vectors.numpy())

    _, first = next(blocks)
    dim = first.shape[1]
    if dim != q.vectors.shape[1]:
        raise ValueError(f"gallery has dim {dim} but queries have dim {q.vectors.shape[1]}")
    factory = _factory_string(options.index, gallery.num_rows)
    try:
        faiss_index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as err:  # faiss reports a bad factory string as a C++ exception dump
        raise ValueError(f"FaissOptions.index={options.index!r} is not a valid faiss factory string") from err
    pending = [as_numpy(prepare(first, metric, cpu, like=q))]
    if not faiss_index.is_trained:
        # Buffer the first rows for training, so one-shot iterables are still read only once.
        buffered = len(pending[0])
        for _, block in blocks:
            if buffered >= options.train_size:
                pending.append(as_numpy(prepare(block, metric, cpu, like=q)))
                break
            pending.append(as_numpy(prepare(block, metric, cpu, like=q)))
            buffered += len(pending[-1])
        faiss_index.train(np.concatenate(pending)[: options.train_size])
    for array in pending:
        faiss_index.add(array)
    total = None if gallery.num_rows is None else -(-gallery.num_rows // gallery.block_size)
    for _, block in tqdm(blocks, total=total, initial=len(pending), disable=not progress, desc="faiss add"):
        faiss_index.add(as_numpy(prepare(block, metric, cpu, like=q)))

    params = faiss.ParameterSpace()
    if options.nprobe is not None:
        params.set_index_parameter(faiss_index, "nprobe", options.nprobe)
    if options.ef_search is not None:
        # an HNSW quantizer of an IVF index ("IVF4096_HNSW32,Flat") takes its efSearch under that prefix
        name = "quantizer_efSearch" if options.is_ivf else "efSearch"
        params.set_index_parameter(faiss_index, name, options.ef_search)

    extra = 0 if exclude is None else 1
    distances, ids = faiss_index.search(as_numpy(q), k + extra)
    scores = torch.from_numpy(distances)
    indices = torch.from_numpy(ids).to(torch.int64)
    if metric == "l2":
        scores = -scores
    # faiss fills missing slots with index -1 and a sentinel distance (FLT_MAX): make them rank last
    scores = torch.where(indices < 0, torch.full_like(scores, float("-inf")), scores)
    if exclude is not None:
        drop = (indices == exclude[:, None]) & (exclude[:, None] >= 0)
        drop[~drop.any(dim=1), -1] = True  # excluded item not retrieved: drop the surplus last result
        keep = ~drop
        scores = scores[keep].view(-1, k)
        indices = indices[keep].view(-1, k)
    return sort_by_score_then_index(scores, indices)
