"""Hamming top-k over packed binary codes: XOR + popcount, exact, with the project's tie rule.

Codes are packed bits (``pack_bits``' uint8 bytes, as the binarized AMES model and ``BinaryCodeStore`` keep
them, or int32 / int64 words); every bit counts. Both paths turn them into int32 words (uint8 rows are padded
with zero bytes to a multiple of four, which adds nothing to a distance; the bit order inside a word does not
matter, since the same permutation applies to both codes) and compute ``popcount(a ^ b)`` summed over words:

- the torch reference counts bits with the SWAR trick on each word widened to int64 (no overflow anywhere);
- the Triton kernel runs one program per (query tile, database tile), the same SWAR count on uint32 words,
  and writes an int32 (Q, block) distance tile.

Either way the database is streamed in blocks of ``block_size`` rows into :class:`RunningTopK`, scored by
negated distance, so memory is O(Q x (k + block_size)) and ties go to the lower database index, exactly as
everywhere else in objretrieval. A fused in-kernel top-k is not done yet.

The Triton kernel needs CUDA tensors, or ``TRITON_INTERPRET=1`` in the environment before its first use to run
on CPU tensors under the Triton interpreter (slow; that is how the tests prove it on CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from objretrieval._validation import check_positive_int, to_tensor
from objretrieval.kernels.dispatch import KernelBackend, jit, resolve_backend
from objretrieval.search.knn import Neighbors
from objretrieval.search.topk import RunningTopK

try:  # Triton ships with torch's Linux wheels; without it only the torch reference runs
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    tl = None

#: Database rows per streamed block.
DEFAULT_BLOCK_SIZE = 4096
#: Query / database rows per Triton program.
TILE_Q, TILE_N = 32, 32
#: Word dtypes accepted for packed codes.
WORD_DTYPES = (torch.uint8, torch.int32, torch.int64)
#: Longest code whose distances float32 scores hold exactly.
MAX_BITS = 2**24


def _popcount32(words: Tensor) -> Tensor:
    """Set bits of each int32 word, as int32 (the SWAR count on the word's 32 bits widened to int64)."""
    v = words.to(torch.int64) & 0xFFFFFFFF  # non-negative and below 2**32: no step below can overflow
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (((v * 0x01010101) >> 24) & 0xFF).to(torch.int32)


def _torch_distances(queries: Tensor, database: Tensor) -> Tensor:
    """(Q, N) int32 Hamming distances between int32-word codes, one word at a time (O(Q x N) memory)."""
    distances = torch.zeros(queries.shape[0], database.shape[0], dtype=torch.int32, device=queries.device)
    for w in range(queries.shape[1]):
        distances += _popcount32(queries[:, w, None] ^ database[None, :, w])
    return distances


def _hamming_tile(
    q_ptr, db_ptr, out_ptr, num_q, num_db, num_words, TILE_Q: tl.constexpr, TILE_N: tl.constexpr
):
    """Triton kernel body: the int32 distances of one (TILE_Q, TILE_N) tile; jitted by :func:`_triton_kernel`."""
    rows = tl.program_id(0) * TILE_Q + tl.arange(0, TILE_Q)
    cols = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)
    row_ok, col_ok = rows < num_q, cols < num_db
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)  # offsets into large databases overflow int32
    distances = tl.zeros((TILE_Q, TILE_N), dtype=tl.int32)
    for w in range(0, num_words):
        a = tl.load(q_ptr + rows64 * num_words + w, mask=row_ok, other=0)
        b = tl.load(db_ptr + cols64 * num_words + w, mask=col_ok, other=0)
        # SWAR popcount as in _popcount32, on uint32 words: logical shifts and a wrapping product.
        x = (a[:, None] ^ b[None, :]).to(tl.uint32, bitcast=True)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        distances += ((x * 0x01010101) >> 24).to(tl.int32)
    out = out_ptr + rows64[:, None] * num_db + cols64[None, :]
    tl.store(out, distances, mask=row_ok[:, None] & col_ok[None, :])


_triton_kernel = jit(_hamming_tile)


def _triton_distances(queries: Tensor, database: Tensor) -> Tensor:
    """(Q, N) int32 Hamming distances between int32-word codes, computed by the Triton kernel."""
    out = torch.empty(queries.shape[0], database.shape[0], dtype=torch.int32, device=queries.device)
    grid = (-(-queries.shape[0] // TILE_Q), -(-database.shape[0] // TILE_N))
    _triton_kernel()[grid](
        queries,
        database,
        out,
        queries.shape[0],
        database.shape[0],
        queries.shape[1],
        TILE_Q=TILE_Q,
        TILE_N=TILE_N,
    )
    return out


def _as_words(t: Tensor, name: str) -> Tensor:
    """Validated packed codes as contiguous (rows, words) int32 words."""
    if t.dtype not in WORD_DTYPES:
        raise TypeError(f"{name} must hold packed codes as uint8, int32 or int64 words, got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_codes, num_words), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one code of at least one word, got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.uint8 and t.shape[1] % 4:
        t = torch.nn.functional.pad(t, (0, 4 - t.shape[1] % 4))  # zero bytes: the same in every code
    t = t.contiguous()
    if t.dtype == torch.uint8 and t.storage_offset() % 4:  # a view as int32 must start on a word boundary
        t = t.clone()
    return t.view(torch.int32)


def _check_codes(queries: Any, database: Any) -> tuple[Tensor, Tensor]:
    """Both code sets as int32 words, after checking that they are comparable."""
    q_in, db_in = to_tensor(queries, "queries"), to_tensor(database, "database")
    q, db = _as_words(q_in, "queries"), _as_words(db_in, "database")
    if q_in.dtype != db_in.dtype or q_in.shape[1] != db_in.shape[1]:
        raise ValueError(
            "queries and database must be codes of one width and word dtype, got "
            f"{q_in.dtype} {tuple(q_in.shape)} and {db_in.dtype} {tuple(db_in.shape)}"
        )
    if q.device != db.device:
        raise ValueError(f"queries and database must be on one device, got {q.device} and {db.device}")
    if q.shape[1] * 32 > MAX_BITS:  # float32 scores would round the distances
        raise ValueError(f"codes may have at most {MAX_BITS} bits, got {q.shape[1]} 32-bit words")
    return q, db


def hamming_distances(queries: Any, database: Any, *, backend: KernelBackend = "torch") -> Tensor:
    """All (Q, N) Hamming distances between packed codes, as int32; O(Q x N) memory.

    Args:
        queries: (Q, W) packed codes, uint8 bytes (as :func:`~objretrieval.descriptors.binary.pack_bits`
            writes them) or int32 / int64 words; every bit counts.
        database: (N, W) codes of the same width and dtype.
        backend: ``"torch"`` (the reference), ``"triton"`` (the kernel) or ``"auto"`` (see :func:`hamming_topk`).

    Returns:
        (Q, N) int32, the number of differing bits of each (query, database) pair.
    """
    q, db = _check_codes(queries, database)
    run = (
        _triton_distances
        if resolve_backend("hamming_topk", backend, q.device) == "triton"
        else _torch_distances
    )
    return run(q, db)


def hamming_topk(
    queries: Any,
    database: Any,
    k: int,
    *,
    backend: KernelBackend = "torch",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Neighbors:
    """The ``k`` database codes nearest each query in Hamming distance; exact, ties to the lower index.

    Args:
        queries: (Q, W) packed codes, uint8 bytes (as :func:`~objretrieval.descriptors.binary.pack_bits`
            writes them) or int32 / int64 words; every bit counts. Non-contiguous views are fine.
        database: (N, W) codes of the same width and dtype, on the same device.
        k: neighbours per query, 1 <= k <= N.
        backend: ``"torch"`` (the reference, any device), ``"triton"`` (the kernel: CUDA tensors, or CPU
            tensors with ``TRITON_INTERPRET=1``) or ``"auto"``: Triton only on a CUDA device where the GPU
            benchmark measured it faster (none yet), torch otherwise and always on CPU.
        block_size: database rows scored at a time; memory is O(Q x (k + block_size)).

    Returns:
        :class:`~objretrieval.search.Neighbors` with ``scores`` (Q, k) float32 Hamming distances (exact
        integers), ascending, and ``indices`` (Q, k) int64 database rows; equal distances in index order.
    """
    q, db = _check_codes(queries, database)
    k = check_positive_int(k, "k")
    if k > db.shape[0]:
        raise ValueError(f"k must be at most the number of database codes ({db.shape[0]}), got {k}")
    block_size = check_positive_int(block_size, "block_size")
    run = (
        _triton_distances
        if resolve_backend("hamming_topk", backend, q.device) == "triton"
        else _torch_distances
    )
    best = RunningTopK(q.shape[0], k, q.device)
    for start in range(0, db.shape[0], block_size):
        # Negated distances: "higher is better" and RunningTopK's tie rule (lower index first) carry over.
        best.update(0, (-run(q, db[start : start + block_size])).to(torch.float32), start)
    return Neighbors(0.0 - best.scores, best.indices)  # 0.0 - x: a distance of 0 is +0.0, never -0.0
