"""faiss as an optional kNN backend: exact flat search, or IVF / HNSW for large galleries.

The gallery is streamed into the index block by block (IVF trains on the first ``train_size`` rows), queries
are searched in one call, and results are returned in objretrieval's conventions: internal scores higher is
better, rows sorted by (score, index). faiss does not promise which of several items tied at the k-th place it
returns; the torch backend does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval.search.scoring import Metric, Prepared, prepare
from objretrieval.search.sources import BlockSource
from objretrieval.search.topk import sort_by_score_then_index

#: Shorthand names accepted for ``index``; anything else is passed to ``faiss.index_factory``.
INDEX_SHORTHANDS = ("flat", "ivf", "hnsw")


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
    index: str,
    nprobe: int | None,
    ef_search: int | None,
    train_size: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Return internal ``(scores, indices)`` of shape (Q, k) on the CPU; missing results have index -1."""
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
    faiss_index = faiss.index_factory(dim, _factory_string(index, gallery.num_rows), faiss_metric)
    pending = [as_numpy(prepare(first, metric, cpu))]
    if not faiss_index.is_trained:
        # Buffer the first rows for training, so one-shot iterables are still read only once.
        buffered = len(pending[0])
        for _, block in blocks:
            if buffered >= train_size:
                pending.append(as_numpy(prepare(block, metric, cpu)))
                break
            pending.append(as_numpy(prepare(block, metric, cpu)))
            buffered += len(pending[-1])
        faiss_index.train(np.concatenate(pending)[:train_size])
    for array in pending:
        faiss_index.add(array)
    total = None if gallery.num_rows is None else -(-gallery.num_rows // gallery.block_size)
    for _, block in tqdm(blocks, total=total, initial=len(pending), disable=not progress, desc="faiss add"):
        faiss_index.add(as_numpy(prepare(block, metric, cpu)))

    params = faiss.ParameterSpace()
    if nprobe is not None:
        params.set_index_parameter(faiss_index, "nprobe", nprobe)
    if ef_search is not None:
        params.set_index_parameter(faiss_index, "efSearch", ef_search)

    extra = 0 if exclude is None else 1
    distances, ids = faiss_index.search(as_numpy(q), k + extra)
    scores = torch.from_numpy(distances)
    indices = torch.from_numpy(ids).to(torch.int64)
    if metric == "l2":
        scores = -scores
    scores = torch.where(indices < 0, torch.full_like(scores, float("-inf")), scores)
    if exclude is not None:
        drop = (indices == exclude[:, None]) & (exclude[:, None] >= 0)
        drop[~drop.any(dim=1), -1] = True  # excluded item not retrieved: drop the surplus last result
        keep = ~drop
        scores = scores[keep].view(-1, k)
        indices = indices[keep].view(-1, k)
    return sort_by_score_then_index(scores, indices)
