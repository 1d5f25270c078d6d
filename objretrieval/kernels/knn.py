"""Fused similarity + running top-k: exact kNN without a score matrix in memory.

Scores are float32 accumulations of products of the inputs (float32, float16 or bfloat16; half inputs are
multiplied exactly and summed in float32): the inner product ``q.g`` (the caller normalises for cosine), or
with squared norms given, ``2 q.g - |g|^2 - |q|^2``, minus the squared L2 distance. The result is the exact
top-k of those scores, best first, equal scores in ascending gallery index, as everywhere in objretrieval.

Both paths rank one int64 *key* per (score, index): the float32 bits mapped to an order-preserving int32 in
the high half, ``2**32 - 1 - index`` in the low half (the key of :func:`~objretrieval.search.topk.
sort_by_score_then_index`), so a descending key is a descending score, then an ascending index, and a top-k is
a selection on one integer. Excluded and padded columns get :data:`MISSING_KEY`, below every real key; a
query with fewer than ``k`` eligible columns gets missing slots (index -1, score -inf) last.

- The torch reference (:func:`reference_topk`) streams (query block x gallery block) products through
  ``torch.topk`` on the keys.
- The Triton kernel runs one program per (tile of ``BLOCK_Q`` queries, chunk of the gallery). It computes
  ``(BLOCK_Q, BLOCK_N)`` score tiles with ``tl.dot`` (float32 accumulator) and turns them into keys in
  registers; the keys above their row's current k-th best (the *threshold*) are appended to the row's
  candidate buffer (``BUF`` keys; most tiles add a few or none once the lists are full). When a buffer could
  not take another tile, and at the end, a bitonic network merges each row's buffer into its running top
  ``K_PAD`` list (``k`` rounded up to a power of two, ascending): the buffer's best ``K_PAD`` (tl.topk's
  scheme), the element-wise maximum with the list (a bitonic half-cleaner), one bitonic merge. Lists and
  buffers live in a per-program slice of global memory (in L2 while the program runs), never a score; the
  registers hold one tile and one merge network of at most ``_NETWORK_KEYS`` keys, whatever ``k``. A
  ``torch.topk`` finally merges the programs' (Q, chunks x K_PAD) lists. Memory: O(Q x chunks x (K_PAD + BUF))
  int64 keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from objretrieval._validation import check_embeddings, check_finite_values, check_labels, check_positive_int
from objretrieval.kernels.dispatch import KernelBackend, jit, resolve_backend
from objretrieval.search.topk import keys_to_scores_and_indices, score_index_keys

try:  # Triton ships with torch's Linux wheels; without it only the torch reference runs
    import triton.language as tl  # type: ignore[import-untyped]
    from triton.runtime.jit import constexpr_function  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    tl = None

    def constexpr_function(fn: Any) -> Any:
        return fn


#: Largest ``k`` (the contract of :func:`fused_topk`; beyond it one row's merge network outgrows registers).
MAX_K = 4096
#: Key of an excluded or padded column: below every real (score, index) key.
MISSING_KEY = -(2**63)
#: Gallery rows the key's 32-bit index field can tell apart.
MAX_GALLERY = 2**32 - 1
#: Input dtypes (the products are exact in float32 for both half formats).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Score elements per step of the torch reference (64 MiB of float32 scores).
_REFERENCE_ELEMENTS = 1 << 24
#: Programs to aim for on a GPU, per streaming multiprocessor: enough that the last wave is a small share.
_PROGRAMS_PER_SM = 4
#: Query rows and gallery columns of a score tile (32 x 128 at 8 warps compiles for sm_90 without spills).
BLOCK_Q, BLOCK_N = 32, 128
#: Most keys in one merge network (rows x BUF): 16 int64 keys, 32 registers, per thread at 8 warps.
_NETWORK_KEYS = 4096
_NUM_WARPS = 8
#: Most int64 keys of lists and buffers that the default chunking allocates (1 GiB).
_SCRATCH_KEYS = 1 << 27


def encode_keys(scores: Tensor, indices: Tensor) -> Tensor:
    """int64 keys ordering (score descending, index ascending), as everywhere in objretrieval
    (:func:`~objretrieval.search.topk.score_index_keys`); ``indices`` lie in [0, 2**32 - 2]."""
    return score_index_keys(scores, indices)


def decode_keys(keys: Tensor, col_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(float32 scores, int64 indices + ``col_offset``) of keys; missing keys give (-inf, -1)."""
    scores, indices = keys_to_scores_and_indices(keys)
    missing = keys == MISSING_KEY
    return scores.masked_fill(missing, float("-inf")), (indices + col_offset).masked_fill(missing, -1)


def _check_vector(x: Any, name: str, length: int, of: str, device: torch.device) -> Tensor:
    """A finite float32 (length,) tensor on ``device``."""
    if not isinstance(x, Tensor) or x.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if tuple(x.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},) (one per row of {of}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like the queries, got {x.device}")
    check_finite_values(x, name)
    return x.contiguous()  # the kernel reads it with unit stride


def _check_inputs(
    queries: Any,
    gallery: Any,
    k: Any,
    query_sq_norms: Any,
    gallery_sq_norms: Any,
    exclude: Any,
    col_offset: Any,
) -> tuple[Tensor, Tensor, int, Tensor | None, Tensor | None, Tensor | None, int]:
    """Validated arguments of :func:`fused_topk`; ``exclude`` comes back as local columns (or None)."""
    q, g = check_embeddings(queries, "queries"), check_embeddings(gallery, "gallery")
    for name, t in (("queries", q), ("gallery", g)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if g.dtype != q.dtype:
        raise TypeError(f"gallery must have the queries' dtype {q.dtype}, got {g.dtype}")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"gallery rows must have the queries' dimension {q.shape[1]}, got {g.shape[1]}")
    if g.device != q.device:
        raise ValueError(f"gallery must be on the queries' device {q.device}, got {g.device}")
    num_q, num_g = q.shape[0], g.shape[0]
    if num_g > MAX_GALLERY:
        raise ValueError(f"gallery may have at most {MAX_GALLERY} rows, got {num_g}")
    k = check_positive_int(k, "k")
    if k > min(num_g, MAX_K):
        raise ValueError(f"k must be at most min(gallery rows, MAX_K) = {min(num_g, MAX_K)}, got {k}")
    col_offset = check_positive_int(col_offset, "col_offset", minimum=0)
    if (query_sq_norms is None) != (gallery_sq_norms is None):
        raise ValueError("query_sq_norms and gallery_sq_norms must be given together (L2) or not at all")
    if query_sq_norms is not None:
        query_sq_norms = _check_vector(query_sq_norms, "query_sq_norms", num_q, "queries", q.device)
        gallery_sq_norms = _check_vector(gallery_sq_norms, "gallery_sq_norms", num_g, "gallery", q.device)
    local_exclude = None
    if exclude is not None:
        ex = check_labels(exclude, "exclude", length=num_q, length_of="queries")
        if ex.device != q.device:
            raise ValueError(f"exclude must be on the queries' device {q.device}, got {ex.device}")
        if ex.numel() and int(ex.min()) < -1:
            raise ValueError(f"exclude must hold gallery indices or -1 (none), got {int(ex.min())}")
        # Columns in this gallery's own numbering; -1 and indices of other shards match no column.
        local_exclude = torch.where(ex < 0, -1, ex - col_offset)
    return q, g, k, query_sq_norms, gallery_sq_norms, local_exclude, col_offset


def _reference_keys(
    q: Tensor, g: Tensor, k: int, q_sq: Tensor | None, g_sq: Tensor | None, exclude: Tensor | None
) -> Tensor:
    """(Q, k) best keys, descending, by torch products in float32, in blocks of bounded size."""
    block_g = min(g.shape[0], 4096)
    block_q = max(1, _REFERENCE_ELEMENTS // block_g)
    best = torch.full((q.shape[0], k), MISSING_KEY, dtype=torch.int64, device=q.device)
    for r0 in range(0, q.shape[0], block_q):
        rows = slice(r0, r0 + block_q)
        qb = q[rows].float()
        for c0 in range(0, g.shape[0], block_g):
            cols = torch.arange(c0, min(c0 + block_g, g.shape[0]), device=q.device)
            scores = torch.mm(qb, g[cols].float().T)
            if q_sq is not None and g_sq is not None:
                scores = 2.0 * scores - g_sq[cols] - q_sq[rows, None]  # the kernel's order of operations
            keys = encode_keys(scores, cols)
            if exclude is not None:
                keys.masked_fill_(exclude[rows, None] == cols, MISSING_KEY)
            merged = torch.cat([best[rows], keys], dim=1)
            best[rows] = merged.topk(k, dim=1).values  # keys are unique: an exact, deterministic selection
    return best


def reference_topk(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    *,
    query_sq_norms: Tensor | None = None,
    gallery_sq_norms: Tensor | None = None,
    exclude: Tensor | None = None,
    col_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The torch reference of :func:`fused_topk` (same arguments, any device): products upcast to float32."""
    q, g, k, q_sq, g_sq, ex, col_offset = _check_inputs(
        queries, gallery, k, query_sq_norms, gallery_sq_norms, exclude, col_offset
    )
    return decode_keys(_reference_keys(q, g, k, q_sq, g_sq, ex), col_offset)


@constexpr_function
def _bit_shape(rank: int, bit: int) -> list[int]:
    """Shape that lays ``arange(0, 2)`` along column bit ``bit`` of a rank-``rank`` hypercube of keys."""
    return [1] * (rank - 1 - bit) + [2] + [1] * bit


@constexpr_function
def _list_shape(log_r: int, log_b: int, log_k: int) -> list[int]:
    """The running lists' hypercube: (ROWS, K_PAD) with size-1 axes at the buffer's dropped column bits."""
    return [2] * log_r + [1] * (log_b - log_k) + [2] * log_k


def _merge_lists(
    out_ptr,
    buf_ptr,
    slots,
    K_PAD: tl.constexpr,
    BUF: tl.constexpr,
    ROWS: tl.constexpr,
    LOG_R: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_B: tl.constexpr,
):
    """Triton device function: merge the candidate buffers of ``ROWS`` lists into them, empty the buffers.

    The buffer's best K_PAD keys, descending (tl.topk's bitonic top-k), against the running list (ascending):
    their element-wise maximum holds the best K_PAD of both as a bitonic sequence, which one bitonic merge
    sorts. The networks run on the keys viewed as a hypercube [2, 2, ...] (row bits, then column bits, lowest
    last); a compare-exchange along column bit j takes the min and max over that axis and puts the larger on
    the side its run's direction asks for: tl.sort's scheme with min / max in place of its xor_sum swap, which
    the interpreter runs at numpy speed (the xor_sum element by element).
    """
    lists = out_ptr + slots[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    buffers = buf_ptr + slots[:, None] * BUF + tl.arange(0, BUF)[None, :]
    h = tl.reshape(tl.load(buffers), [2] * (LOG_R + LOG_B))
    tl.store(buffers, tl.full((ROWS, BUF), -9223372036854775807 - 1, tl.int64))  # MISSING_KEY
    for stage in tl.static_range(1, LOG_K + 1):  # sort runs of 2**stage, alternately up and down
        down = tl.reshape(tl.arange(0, 2), _bit_shape(LOG_R + LOG_B, stage)) if stage < LOG_B else 1
        for i in tl.static_range(stage):  # compare-exchange along column bit stage - 1 - i
            side = tl.reshape(tl.arange(0, 2), _bit_shape(LOG_R + LOG_B, stage - 1 - i))
            lo = tl.min(h, axis=LOG_R + LOG_B - stage + i, keep_dims=True)
            hi = tl.max(h, axis=LOG_R + LOG_B - stage + i, keep_dims=True)
            h = tl.where((side ^ down) != 0, hi, lo)
    for stage in tl.static_range(LOG_K + 1, LOG_B + 1):  # keep the better of paired runs, re-sort
        h = tl.max(h, axis=LOG_R + LOG_B - stage, keep_dims=True)  # column bit stage - 1 drops out
        down = tl.reshape(tl.arange(0, 2), _bit_shape(LOG_R + LOG_B, stage)) if stage < LOG_B else 1
        for i in tl.static_range(LOG_K):  # compare-exchange along column bit LOG_K - 1 - i
            side = tl.reshape(tl.arange(0, 2), _bit_shape(LOG_R + LOG_B, LOG_K - 1 - i))
            lo = tl.min(h, axis=LOG_R + LOG_B - LOG_K + i, keep_dims=True)
            hi = tl.max(h, axis=LOG_R + LOG_B - LOG_K + i, keep_dims=True)
            h = tl.where((side ^ down) != 0, hi, lo)
    h = tl.maximum(tl.reshape(tl.load(lists), _list_shape(LOG_R, LOG_B, LOG_K)), h)
    for i in tl.static_range(LOG_K):  # bitonic merge, ascending
        side = tl.reshape(tl.arange(0, 2), _bit_shape(LOG_R + LOG_B, LOG_K - 1 - i))
        lo = tl.min(h, axis=LOG_R + LOG_B - LOG_K + i, keep_dims=True)
        hi = tl.max(h, axis=LOG_R + LOG_B - LOG_K + i, keep_dims=True)
        h = tl.where(side != 0, hi, lo)
    tl.store(lists, tl.reshape(h, (ROWS, K_PAD)))


def _fused_topk_kernel(
    q_ptr,
    g_ptr,
    q_sq_ptr,
    g_sq_ptr,
    exclude_ptr,
    out_ptr,
    buf_ptr,
    num_q,
    num_g,
    dim,
    k,
    tiles_per_chunk,
    num_chunks,
    stride_qm,
    stride_qd,
    stride_gn,
    stride_gd,
    MERGE: tl.constexpr,
    HAS_NORMS: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    PRECISION: tl.constexpr,
    K_PAD: tl.constexpr,
    BUF: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    LOG_R: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_B: tl.constexpr,
):
    """Triton kernel body: the running top-K_PAD lists of one query tile over one gallery chunk.

    ``out_ptr`` / ``buf_ptr`` hold one list (K_PAD keys, ascending) and one candidate buffer (BUF keys) per
    (query row, chunk), all MISSING_KEY at the start; ``MERGE`` is :func:`_merge_lists`, jitted.
    """
    chunk = tl.program_id(1)
    first_row = tl.program_id(0) * BLOCK_Q
    rows = first_row + tl.arange(0, BLOCK_Q)
    row_ok = rows < num_q
    rows64 = rows.to(tl.int64)  # offsets into large galleries overflow int32
    slots = rows64 * num_chunks + chunk  # this program's list and buffer of each row
    if HAS_NORMS:
        q_sq = tl.load(q_sq_ptr + rows64, mask=row_ok, other=0.0)
    if HAS_EXCLUDE:
        excluded = tl.load(exclude_ptr + rows64, mask=row_ok, other=-1)
    threshold = tl.full((BLOCK_Q,), -9223372036854775807 - 1, tl.int64)  # each list's k-th best
    count = tl.zeros((BLOCK_Q,), dtype=tl.int32)  # keys in each buffer
    dims = tl.arange(0, BLOCK_D)
    first = chunk.to(tl.int64) * tiles_per_chunk  # int64 tile numbers: column offsets of huge galleries
    stop = tl.minimum(first + tiles_per_chunk, tl.cdiv(num_g, BLOCK_N))
    for tile in range(first, stop):
        cols64 = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols64 < num_g
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + dims
            d_ok = d < dim
            a = tl.load(
                q_ptr + rows64[:, None] * stride_qm + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                g_ptr + d[:, None] * stride_gd + cols64[None, :] * stride_gn,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_NORMS:
            g_sq = tl.load(g_sq_ptr + cols64, mask=col_ok, other=0.0)
            acc = 2.0 * acc - g_sq[None, :] - q_sq[:, None]  # the reference's order: exact doubling first
        # encode_keys: order-preserving int32 of the score (-0.0 folded) high, 2**32 - 1 - column low.
        bits = tl.where(acc == 0.0, 0.0, acc).to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        keys = (ordered << 32) + ((-1 - cols64) + 4294967296)[None, :]
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_EXCLUDE:
            valid = valid & (cols64[None, :] != excluded[:, None])
        # Candidates beat their list's k-th best (the rest can never enter the top k): append them to the
        # buffers. The list keeps K_PAD >= k keys; those below its k-th are never needed.
        candidate = valid & (keys > threshold[:, None])
        position = count[:, None] + tl.cumsum(candidate.to(tl.int32), axis=1) - 1
        tl.store(buf_ptr + slots[:, None] * BUF + position, keys, mask=candidate)
        count += tl.sum(candidate.to(tl.int32), axis=1)
        # Merge the buffers into the lists once one could not take another tile, and at the end. Nothing of
        # the tile lives across the merge, which leaves the registers to its network.
        if (tl.max(count) > BUF - BLOCK_N) | (tile == stop - 1):
            tl.debug_barrier()  # every thread's appends are visible to the merge
            for group in range(BLOCK_Q // ROWS):
                group_rows = (first_row + group * ROWS + tl.arange(0, ROWS)).to(tl.int64)
                MERGE(
                    out_ptr, buf_ptr, group_rows * num_chunks + chunk, K_PAD, BUF, ROWS, LOG_R, LOG_K, LOG_B
                )
            tl.debug_barrier()
            threshold = tl.load(out_ptr + slots * K_PAD + K_PAD - k)  # ascending lists: the k-th best
            count = tl.zeros((BLOCK_Q,), dtype=tl.int32)


# Made at first use, in the mode (compiled or interpreted) TRITON_INTERPRET asks for then; the device function
# reaches the kernel as its MERGE argument, so both are always made in the same mode.
_triton_kernel = jit(_fused_topk_kernel)
_triton_merge = jit(_merge_lists)


def _default_chunks(device: torch.device, q_tiles: int, keys_per_chunk: int) -> int:
    """Gallery chunks for ``q_tiles`` query tiles: about ``_PROGRAMS_PER_SM`` programs per SM of a GPU, so
    that a few queries still fill it, within ``_SCRATCH_KEYS`` of lists and buffers; one on a CPU (the
    interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    programs = _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-programs // q_tiles), _SCRATCH_KEYS // keys_per_chunk))


def _launch(
    q: Tensor,
    g: Tensor,
    k: int,
    q_sq: Tensor | None,
    g_sq: Tensor | None,
    exclude: Tensor | None,
    num_chunks: int | None,
) -> tuple[tuple[int, int], tuple[Any, ...], dict[str, Any]]:
    """(grid, positional arguments, constexpr and launch options) of the kernel; the first of its tensor
    arguments after the inputs is the (rows, chunks, K_PAD) list tensor, which holds the result."""
    num_q, num_g = q.shape[0], g.shape[0]
    k_pad = 1 << (k - 1).bit_length()
    buf = max(k_pad, 2 * BLOCK_N)  # room for the buffer's top-k, and for a tile after a merge is due
    rows = max(1, min(BLOCK_Q, _NETWORK_KEYS // buf))
    num_tiles, q_tiles = -(-num_g // BLOCK_N), -(-num_q // BLOCK_Q)
    if num_chunks is None:
        num_chunks = _default_chunks(q.device, q_tiles, q_tiles * BLOCK_Q * (k_pad + buf))
    tiles_per_chunk = -(-num_tiles // min(num_chunks, num_tiles))
    num_chunks = -(-num_tiles // tiles_per_chunk)  # no empty chunk
    # Rows padded to whole query tiles, so that the merges need no row masks.
    lists = torch.full(
        (q_tiles * BLOCK_Q, num_chunks, k_pad), MISSING_KEY, dtype=torch.int64, device=q.device
    )
    buffers = torch.full(
        (q_tiles * BLOCK_Q, num_chunks, buf), MISSING_KEY, dtype=torch.int64, device=q.device
    )
    args = (
        q,
        g,
        lists if q_sq is None else q_sq,  # (pointer arguments that a constexpr flag disables)
        lists if g_sq is None else g_sq,
        lists if exclude is None else exclude,
        lists,
        buffers,
        num_q,
        num_g,
        q.shape[1],
        k,
        tiles_per_chunk,
        num_chunks,
        q.stride(0),
        q.stride(1),
        g.stride(0),
        g.stride(1),
    )
    meta = {
        "MERGE": _triton_merge(),
        "HAS_NORMS": q_sq is not None,
        "HAS_EXCLUDE": exclude is not None,
        "PRECISION": "ieee",  # float32 inputs: true float32 products, not TF32 (no effect on half inputs)
        "K_PAD": k_pad,
        "BUF": buf,
        "BLOCK_Q": BLOCK_Q,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": 32 if q.dtype == torch.float32 else 64,
        "ROWS": rows,
        "LOG_R": rows.bit_length() - 1,
        "LOG_K": k_pad.bit_length() - 1,
        "LOG_B": buf.bit_length() - 1,
        "num_warps": _NUM_WARPS,
        # The scores' 2 acc - |g|^2 needs no contraction (2 acc is exact); say so, for the same code anywhere.
        "enable_fp_fusion": False,
    }
    return (q_tiles, num_chunks), args, meta


def _triton_keys(
    q: Tensor,
    g: Tensor,
    k: int,
    q_sq: Tensor | None,
    g_sq: Tensor | None,
    exclude: Tensor | None,
    num_chunks: int | None,
) -> Tensor:
    """(Q, k) best keys, descending, by the fused kernel and a ``torch.topk`` over its partial lists."""
    grid, args, meta = _launch(q, g, k, q_sq, g_sq, exclude, num_chunks)
    _triton_kernel()[grid](*args, **meta)
    lists = args[5]
    return lists[: q.shape[0]].flatten(1).topk(k, dim=1).values


def fused_topk(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    *,
    query_sq_norms: Tensor | None = None,
    gallery_sq_norms: Tensor | None = None,
    exclude: Tensor | None = None,
    col_offset: int = 0,
    backend: KernelBackend = "torch",
    num_chunks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The exact top-``k`` gallery rows of each query by float32-accumulated scores, best first.

    Args:
        queries: (Q, D) float32, float16 or bfloat16.
        gallery: (N, D), the queries' dtype and device.
        k: neighbours per query, 1 <= k <= min(N, :data:`MAX_K`).
        query_sq_norms: (Q,) float32 squared norms: with ``gallery_sq_norms``, scores are
            ``2 q.g - |g|^2 - |q|^2`` (minus the squared L2 distance); without, the inner product.
        gallery_sq_norms: (N,) float32; given with ``query_sq_norms`` or not at all.
        exclude: (Q,) integer gallery index skipped per query (leave-one-out passes ``arange(Q)``), in the
            caller's numbering (``col_offset`` included); -1 or an index outside this gallery skips nothing.
        col_offset: the caller's index of gallery row 0; returned indices include it.
        backend: ``"torch"`` (:func:`reference_topk`, the default), ``"triton"`` (the kernel: CUDA tensors,
            or CPU tensors with ``TRITON_INTERPRET=1``) or ``"auto"`` (the kernel only on a GPU where it was
            measured faster).
        num_chunks: gallery chunks searched by separate programs (Triton only), each with its own lists and
            buffers; None: about ``4 x SMs / query tiles`` on a GPU within 1 GiB of them, one on a CPU.

    Returns:
        (Q, k) float32 scores, descending, and (Q, k) int64 indices, equal scores in ascending index; a query
        with fewer than ``k`` columns left after ``exclude`` ends with missing slots (-inf, -1).
    """
    q, g, k, q_sq, g_sq, ex, col_offset = _check_inputs(
        queries, gallery, k, query_sq_norms, gallery_sq_norms, exclude, col_offset
    )
    if num_chunks is not None:
        num_chunks = check_positive_int(num_chunks, "num_chunks")
    if resolve_backend("knn", backend, q.device) == "torch":
        return decode_keys(_reference_keys(q, g, k, q_sq, g_sq, ex), col_offset)
    return decode_keys(_triton_keys(q, g, k, q_sq, g_sq, ex, num_chunks), col_offset)
