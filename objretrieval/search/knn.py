"""Exact (and optionally approximate) kNN search, used by every evaluation and reranking step."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from objretrieval._validation import (
    check_choice,
    check_embeddings,
    check_positive_int,
    to_tensor,
)
from objretrieval.display import neighbors_html
from objretrieval.progress import show_progress
from objretrieval.search.exact import (
    PRECISIONS,
    ExactTopK,
    Precision,
    Screen,
    SearchStats,
    check_stats,
    exact_topk_of_candidates,
    search_blocks,
    self_search,
)
from objretrieval.search.faiss_backend import FaissOptions, faiss_search, resolve_faiss_options
from objretrieval.search.scoring import Metric, mask_excluded, prepare, to_user_scores
from objretrieval.search.sources import BlockSource, GalleryLike

if TYPE_CHECKING:  # imported lazily at run time: objretrieval.distributed builds on this module
    from objretrieval.distributed.world import Group

Backend = Literal["torch", "faiss", "triton"]
#: Extra candidates the fused kernel returns per query beyond k, so that most rows are certified at once.
_KERNEL_EXTRA = 32
_MAX_GALLERY = 2**32 - 2  # gallery indices share an int64 sort key with the score (see topk.py)


class Neighbors(NamedTuple):
    """The ``k`` nearest gallery items of each query, best first.

    The torch backend ranks by exact scores (see :mod:`objretrieval.search.exact`): the same neighbours and
    the same score bits for any block size, query batch, device or number of processes, and for float32 or
    bf16-exact screening.

    Approximate faiss indexes may find fewer than ``k`` items for a query. Such a slot is *missing*: index -1
    and the worst possible score (-inf for similarities, +inf for squared distances), so missing slots always
    come last in their row. Mask them (:attr:`missing`) before indexing with ``indices``: -1 would select the
    last gallery row. :func:`knn` warns when there are any. The torch backend is exact and never leaves a slot
    missing.

    Attributes:
        scores: (Q, k) float32. Similarity for ``metric="cosine"`` or ``"ip"`` (descending); squared Euclidean
            distance for ``metric="l2"`` (ascending).
        indices: (Q, k) int64 gallery row indices, -1 for a missing slot.
    """

    scores: Tensor
    indices: Tensor

    @property
    def missing(self) -> Tensor:
        """(Q, k) bool, True at slots for which no gallery item was found."""
        return self.indices < 0

    @property
    def num_missing(self) -> int:
        """Number of missing slots over all queries."""
        return int(self.missing.sum())

    def _repr_html_(self) -> str:
        """A truncated (Q, k) table of ``index (score)`` (see :func:`objretrieval.display.neighbors_html`)."""
        return neighbors_html(self)


def knn(
    queries: Tensor | GalleryLike,
    gallery: GalleryLike | None = None,
    *,
    k: int,
    metric: Metric = "cosine",
    exclude: Tensor | None = None,
    backend: Backend = "torch",
    faiss: FaissOptions | None = None,
    block_size: int | None = None,
    query_block_size: int = 4096,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    precision: Precision = "float32",
    stats: SearchStats | None = None,
    group: Group | None = None,
) -> Neighbors:
    """Find the ``k`` nearest gallery items of every query, streaming the gallery in blocks.

    Memory is O((Q + block) x k) plus one (query block x gallery block) score matrix: the Q x N matrix is not
    formed. Half-precision inputs are upcast so products accumulate in float32. The torch backend is exact:
    matrix products only screen the pairs, and the pairs that can still enter a top-k get an exact score
    (:mod:`objretrieval.search.exact`), so results, ties included (lower gallery index first), do not depend on
    block sizes, query batches, devices or the screening precision.

    Args:
        queries: (Q, D) tensor or numpy array.
        gallery: (N, D) tensor, numpy array/memmap, h5py dataset, or iterable of (n_i, D) blocks. ``None``
            searches the queries against themselves with each query's own row excluded (leave-one-out); the
            torch backend then computes each pair's score once, using the symmetry of the score matrix.
        k: neighbours per query.
        metric: ``"cosine"`` (vectors are L2-normalised first), ``"ip"`` (raw inner product) or ``"l2"``
            (squared Euclidean distance; nearly coincident pairs, where the matrix-product formula cancels,
            are recomputed from their differences).
        exclude: optional (Q,) int64 gallery index to exclude for each query, -1 for none.
        backend: ``"torch"`` (exact, CPU or CUDA), ``"faiss"`` (CPU; exact or approximate, see ``faiss``) or
            ``"triton"``: the fused similarity + top-k kernel (:func:`objretrieval.kernels.knn.fused_topk`;
            CUDA tensors, or the Triton interpreter) screens a gallery tensor, its candidates are scored
            exactly and rows it cannot prove are searched again by the torch engine: the torch backend's
            results, bit for bit.
        faiss: options of the faiss backend (index type, ``nprobe``, ``ef_search``, ``train_size``); only with
            ``backend="faiss"``, where ``None`` means ``FaissOptions()``, an exact flat index.
        block_size: gallery rows per block; by default 4096, or more for small query sets so that each score
            block still holds about 16M entries (large matrix products run faster).
        query_block_size: query rows scored against one gallery block at once (torch backend).
        device: where to compute; default the queries' device. Results are returned there.
        progress: show a tqdm progress bar over gallery blocks; None (the default): only for long searches
            (:func:`objretrieval.progress.show_progress`, above 1e12 multiply-adds).
        precision: the screening products of the torch backend: ``"float32"``, or ``"bf16-exact"``: bfloat16
            products (about 2.6x the float32 rate on AVX-512 BF16 CPUs, more on GPUs) with a rigorous error
            bound, and exact scores for every pair within it of a row's k-th. Results are identical to
            ``"float32"``; only the number of exact scores (``stats.rescored``) grows.
        stats: optional :class:`~objretrieval.search.exact.SearchStats`, filled in with the number of pairs
            screened and scored exactly (torch backend).
        group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``). Only when it
            is passed, the call is the collective sharded search
            :func:`objretrieval.distributed.knn.sharded_knn`: ``queries`` and ``gallery`` (tensors) are this
            rank's shards with rank-major global ids, and the result is bit-identical to one process on the
            concatenated data (torch backend, no ``exclude``). Without it, even under DDP, the search is local.

    Returns:
        :class:`Neighbors` ``(scores, indices)``, each (Q, k). An approximate faiss index may leave slots
        missing (see :class:`Neighbors`); a ``RuntimeWarning`` then says how many queries got fewer than k.

    Raises:
        ValueError: on shape or dimension mismatches, NaN/inf values, ``k`` larger than the gallery (minus the
            excluded item), ``exclude`` ids outside the gallery, or ``faiss`` options with the torch backend.
        TypeError: if ``faiss`` is not a :class:`FaissOptions`.
    """
    precision = check_choice(precision, "precision", PRECISIONS)
    check_stats(stats)
    if group is not None:
        if exclude is not None or backend != "torch" or faiss is not None or progress is True:
            raise ValueError("knn(group=...) supports the torch backend only, without exclude or progress")
        if not isinstance(queries, Tensor) or not isinstance(gallery, (Tensor, type(None))):
            raise TypeError("knn(group=...) takes this rank's queries and gallery shard as tensors")
        from objretrieval.distributed.knn import sharded_knn  # imported here: it builds on this module

        return sharded_knn(
            queries,
            gallery,
            k=k,
            metric=metric,
            block_size=block_size,
            query_block_size=query_block_size,
            device=device,
            precision=precision,
            stats=stats,
            group=group,
        )
    q = check_embeddings(queries, "queries")
    k = check_positive_int(k, "k")
    gallery_rows = q.shape[0] if gallery is None else getattr(gallery, "num_rows", None) or _rows(gallery)
    progress = show_progress(
        progress, None if gallery_rows is None else q.shape[0] * gallery_rows * q.shape[1]
    )
    query_block_size = check_positive_int(query_block_size, "query_block_size")
    if block_size is None:
        block_size = 4096 if gallery is None else default_block_size(min(q.shape[0], query_block_size))
    block_size = check_positive_int(block_size, "block_size")
    metric = check_choice(metric, "metric", Metric)
    backend = check_choice(backend, "backend", Backend)
    options = resolve_faiss_options(backend, faiss)
    if options is not None and precision != "float32":
        raise ValueError(f"precision={precision!r} is an option of our own search, not of the faiss backend")
    if backend == "triton":
        if isinstance(gallery, BlockSource) and gallery.tensor is not None:
            gallery = gallery.tensor
        if not isinstance(gallery, (Tensor, type(None))):
            raise TypeError(f"backend='triton' searches a gallery tensor, got {type(gallery).__name__}")
        if progress is True:
            raise ValueError("progress is not available with backend='triton' (one kernel call)")
    screen = Screen(metric, precision)
    if stats is not None:
        stats.precision, stats.queries = precision, stats.queries + q.shape[0]
    compute_device = torch.device(device) if device is not None else q.device

    if gallery is None:
        if exclude is not None:
            raise ValueError(
                "exclude cannot be combined with gallery=None, which already excludes each query"
            )
        check_k(k, q.shape[0] - 1, "the queries minus the excluded query itself")
        if backend == "triton":
            return _kernel_knn(q, None, k, metric, None, screen, compute_device, block_size, stats)
        if options is None:
            state = ExactTopK(q.shape[0], k, compute_device, stats)
            self_search(prepare(q, metric, compute_device), screen, state, block_size, progress)
            return Neighbors(to_user_scores(state.scores, metric), state.indices)
        source = BlockSource(q, "queries", block_size)
        exclude_ids: Tensor | None = torch.arange(q.shape[0])
    else:
        source = gallery if isinstance(gallery, BlockSource) else BlockSource(gallery, "gallery", block_size)
        if source.dim is not None and source.dim != q.shape[1]:
            raise ValueError(f"gallery has dim {source.dim} but queries have dim {q.shape[1]}")
        if source.num_rows is not None and source.num_rows > _MAX_GALLERY:
            raise ValueError(f"gallery has {source.num_rows} rows; at most {_MAX_GALLERY} are supported")
        exclude_ids = _check_exclude(exclude, q.shape[0], source.num_rows)
        if source.num_rows is not None:  # iterables reveal their size only once read: checked below
            _check_k_gallery(k, source.num_rows, exclude_ids)

    if backend == "triton":
        assert isinstance(gallery, Tensor)
        return _kernel_knn(q, gallery, k, metric, exclude_ids, screen, compute_device, block_size, stats)
    if options is not None:
        scores, indices = faiss_search(
            q, source, k, metric, exclude=exclude_ids, options=options, progress=progress
        )
        scores, indices = scores.to(compute_device), indices.to(compute_device)
    else:
        state = ExactTopK(q.shape[0], k, compute_device, stats)
        search_blocks(
            prepare(q, metric, compute_device),
            source,
            screen,
            state,
            device=compute_device,
            query_block_size=query_block_size,
            exclude=None if exclude_ids is None else exclude_ids.to(compute_device),
            progress=progress,
        )
        scores, indices = state.scores, state.indices
    assert source.num_rows is not None
    _check_k_gallery(k, source.num_rows, exclude_ids)
    if options is not None:
        _warn_missing(indices, k, options)
    return Neighbors(to_user_scores(scores, metric), indices)


def _kernel_knn(
    q: Tensor,
    gallery: Tensor | None,
    k: int,
    metric: Metric,
    exclude: Tensor | None,
    screen: Screen,
    device: torch.device,
    block_size: int,
    stats: SearchStats | None,
) -> Neighbors:
    """``backend="triton"``: the fused kernel screens, exact scores rank, and the block engine redoes, on the
    same prepared rows, the queries the kernel's candidates do not prove
    (:func:`~objretrieval.search.exact.exact_topk_of_candidates`)."""
    from objretrieval.kernels.knn import MAX_K, fused_topk  # the kernels build on this module

    prepared = prepare(q, metric, device)
    g = None if gallery is None else check_embeddings(gallery, "gallery")
    g_prep = prepared if g is None else prepare(g, metric, device, like=prepared)  # dims and k: checked
    n = len(g_prep)
    ex = torch.arange(len(prepared), device=device) if g is None else exclude
    ex = None if ex is None else ex.to(device)
    available = torch.full((len(prepared),), n, device=device)
    if ex is not None:
        available -= ((ex >= 0) & (ex < n)).long()
    qs, gs = screen.rows(prepared, "queries"), screen.rows(g_prep, "gallery")
    # bfloat16 inputs leave a wider bound: more candidates, so that most rows are proven at once
    extra = _KERNEL_EXTRA if screen.precision == "float32" else 4 * _KERNEL_EXTRA
    l2 = metric == "l2"
    screened, candidates = fused_topk(
        qs.operand,
        gs.operand,
        min(n, MAX_K, max(2 * k, k + extra)),
        query_sq_norms=prepared.sq_norms if l2 else None,
        gallery_sq_norms=g_prep.sq_norms if l2 else None,
        exclude=ex,
        backend="triton",
    )
    if stats is not None:
        stats.screened += len(prepared) * n
    scores, indices, redo = exact_topk_of_candidates(
        qs, gs, screened, candidates, k, screen, available, stats
    )
    if redo.numel():  # rows whose k-th could still be beaten: the block engine, on those rows only
        rows = qs.select(redo)
        state = ExactTopK(len(redo), k, device, stats)
        redo_ex = None if ex is None else ex[redo]
        for col in range(0, n, block_size):
            block = gs.rows(col, col + block_size)
            s = screen.scores(rows, block)
            mask_excluded(s, redo_ex, 0, col)
            state.update(0, s, col, rows.points, block.points, metric, screen.bounds(rows, block))
        scores[redo], indices[redo] = state.scores, state.indices
    return Neighbors(to_user_scores(scores, metric), indices)


def _rows(gallery: object) -> int | None:
    """Rows of an array-like gallery; None for iterables, whose size shows only once read."""
    shape = getattr(gallery, "shape", None)
    return None if shape is None or len(shape) == 0 else int(shape[0])


def _warn_missing(indices: Tensor, k: int, options: FaissOptions) -> None:
    short = int((indices < 0).any(dim=1).sum())
    if short:
        warnings.warn(
            f"faiss index {options.index!r} found fewer than k={k} neighbours for {short} of "
            f"{indices.shape[0]} queries; those slots are missing (index -1, ranked last; see "
            "Neighbors.missing). Probe more lists (nprobe) or search deeper (ef_search) to fill them.",
            RuntimeWarning,
            stacklevel=3,
        )


def default_block_size(query_rows: int) -> int:
    """Gallery rows per block: at least 4096, more for few queries so a score block holds about 16M entries."""
    return int(min(32768, max(4096, (1 << 24) // query_rows)))


def check_k(k: int, available: int, what: str) -> None:
    """Refuse a search with nothing to retrieve, or ``k`` above the ``available`` items."""
    if available <= 0:
        raise ValueError(f"cannot search: {what} leaves no items to retrieve")
    if k > available:
        raise ValueError(f"k={k} is larger than {what} ({available} items)")


def _check_k_gallery(k: int, num_rows: int, exclude: Tensor | None) -> None:
    if exclude is None:
        check_k(k, num_rows, "the gallery")
    else:
        check_k(k, num_rows - 1, "the gallery minus the excluded item")


def _check_exclude(exclude: Tensor | None, num_queries: int, num_gallery: int | None) -> Tensor | None:
    if exclude is None:
        return None
    ex = to_tensor(exclude, "exclude")
    if ex.dtype.is_floating_point or ex.dtype == torch.bool:
        raise TypeError(f"exclude must hold integer gallery indices, got dtype {ex.dtype}")
    ex = ex.to(torch.int64).cpu()
    if tuple(ex.shape) != (num_queries,):
        raise ValueError(
            f"exclude must have shape ({num_queries},) (one gallery index per query, -1 for none), "
            f"got {tuple(ex.shape)}"
        )
    too_big = num_gallery is not None and int(ex.max()) >= num_gallery
    if int(ex.min()) < -1 or too_big:
        raise ValueError(
            f"exclude holds ids outside [-1, {num_gallery}): min {int(ex.min())}, max {int(ex.max())}"
        )
    return ex
