"""AVSL's propagated pairwise distance, fused: no (R, C, E) tensor per level, only the (R, C) distances.

For rows i and columns j (L levels of E nodes, see :mod:`objretrieval.models.avsl`)::

    D_l(i, j, n) = |x_l,i,n - y_l,j,n|^p                   (x, y: L_p-normalised embeddings)
    D^_0 = D_0,    D^_l = P_l * D_l + (1 - P_l) * (D^_{l-1} @ W_l),    d(i, j) = sum_n D^_{L-1}(i, j, n)
    P_l(i, j, n) = sigmoid(gamma * scale_l,n * c_l,i,n * c_l,j,n + gamma * bias_l,n)

The matrix product mixes the nodes of a pair, so each pair needs its whole E-vector D^_{l-1} before any node
of D^_l: the work is a (pairs, E) x (E, E) product per level, and today's path
(:meth:`~objretrieval.models.AttributableSimilarity.forward`, :class:`~objretrieval.models.AVSLScorer`) keeps
several (R, C, E) float32 tensors alive per block to do it. Two implementations of the same computation:

- the torch reference (:func:`avsl_distance` with ``backend="torch"``): the same operations as the model's
  inference path, on chunks of rows against all columns, so memory is O(chunk x C x E);
- the Triton kernel: persistent programs, each looping over tiles of ``TILE_R x TILE_C`` pairs. Level 1's
  product reads D_0 recomputed from the embeddings block by block; level l >= 2 reads D^_{l-1} from the
  program's own scratch rows (``TILE_R * TILE_C x E`` float32, one buffer for 3 levels, two from 4 on, small
  enough to stay in L2), written by the previous level. The product runs in float32 (``ieee``, or ``tf32``
  when ``torch.backends.cuda.matmul.allow_tf32`` allows it for torch too) and the last level is summed over
  nodes in registers, so only the (R, C) distances reach memory.

Both are inference only: the gradient of the final distance (into the reliabilities) needs the per-node
tensors, so a call with autograd recording and inputs or parameters that require gradients raises; use the
model's ``backend="torch"`` path to train.

Inputs of any floating dtype are accepted (float16 / bfloat16 features included); embeddings are normalised
and every operand cast to float32 before the kernel ((R + C) x (2L - 1) x E floats, as the model does), so
accumulation is float32 throughout. Tile and block sizes are first choices, not yet tuned on a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from objretrieval._validation import check_positive_int
from objretrieval.kernels.dispatch import KernelBackend, jit, resolve_backend

if TYPE_CHECKING:
    from objretrieval.models.avsl import AttributableSimilarity, AVSLFeatures

try:  # Triton ships with torch's Linux wheels; without it only the torch reference runs
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    tl = None

#: Rows and columns of the pair tile one Triton program computes at a time.
TILE_R, TILE_C = 8, 8
#: Lower-level nodes (the product's reduction) and higher-level nodes per block of the product.
BLOCK_K, BLOCK_N = 32, 64
#: Persistent programs per streaming multiprocessor on CUDA (each owns its scratch rows).
PROGRAMS_PER_SM = 2
#: Persistent programs under the interpreter: few, so that tests see programs reuse their scratch.
INTERPRETER_PROGRAMS = 3
#: Elements per (chunk, C, E) tensor of the torch reference (32 MiB in float32).
CHUNK_ELEMENTS = 2**23


class PropagationOperands(NamedTuple):
    """What both implementations read, float32 and contiguous; L levels, E nodes, R rows, C columns.

    Attributes:
        rows: (R, L, E) L_p-normalised row embeddings (an image's levels side by side: 64-bit offsets are
            needed only for the image index).
        cols: (C, L, E) L_p-normalised column embeddings.
        rows_reliability: (R, L-1, E) ``gamma * scale_l * c_l`` of the rows, levels 1..L-1.
        cols_certainty: (C, L-1, E) ``c_l`` of the columns, levels 1..L-1.
        bias: (L-1, E) ``gamma * bias_l``.
        weights: (L-1, E, E) propagation weights W_l (low node m -> high node n).
        p: the exponent of the per-node distance.
    """

    rows: Tensor
    cols: Tensor
    rows_reliability: Tensor
    cols_certainty: Tensor
    bias: Tensor
    weights: Tensor
    p: float


def propagation_operands(
    similarity: AttributableSimilarity,
    rows: AVSLFeatures,
    cols: AVSLFeatures,
    weights: Tensor | None = None,
) -> PropagationOperands:
    """The operands of :func:`avsl_distance`, computed exactly as the model's ``_node_terms`` does."""
    device = rows.embeddings[0].device
    if cols.embeddings[0].device != device:
        raise ValueError(f"rows and cols must be on one device, got {device} and {cols.embeddings[0].device}")
    levels = range(1, similarity.num_levels)
    weights = similarity.propagation_weights() if weights is None else weights
    expected = (similarity.num_levels - 1, similarity.embed_dim, similarity.embed_dim)
    if tuple(weights.shape) != expected:
        raise ValueError(f"weights must be {expected} propagation weights, got shape {tuple(weights.shape)}")
    scale = similarity.reliability_scale.detach().to(device)
    bias = similarity.reliability_bias.detach().to(device)

    def normalised(features: AVSLFeatures) -> Tensor:
        levels = [F.normalize(e.detach().float(), p=similarity.p, dim=-1) for e in features.embeddings]
        return torch.stack(levels, dim=1)

    return PropagationOperands(
        normalised(rows),
        normalised(cols),
        torch.stack(
            [rows.certainties[lv].detach().float() * (similarity.gamma * scale[lv - 1]) for lv in levels],
            dim=1,
        ),
        torch.stack([cols.certainties[lv].detach().float() for lv in levels], dim=1),
        (similarity.gamma * bias).contiguous(),
        weights.detach().to(device, torch.float32).contiguous(),
        similarity.p,
    )


def _requires_grad(similarity: AttributableSimilarity, rows: AVSLFeatures, cols: AVSLFeatures) -> bool:
    """Whether autograd would record this distance (the fused paths cannot give its gradient)."""
    if not torch.is_grad_enabled():
        return False
    tensors = [*rows.embeddings, *rows.certainties, *cols.embeddings, *cols.certainties]
    tensors += [similarity.reliability_scale, similarity.reliability_bias]
    return any(t.requires_grad for t in tensors)


def use_kernel(
    backend: KernelBackend, similarity: AttributableSimilarity, rows: AVSLFeatures, cols: AVSLFeatures
) -> bool:
    """Whether the model computes this distance with the kernel: ``backend`` resolved for ``"avsl_distance"``.

    Where gradients are needed, ``"auto"`` keeps the model's own path and ``"triton"`` raises.
    """
    chosen = resolve_backend("avsl_distance", backend, rows.embeddings[0].device) == "triton"
    if chosen and _requires_grad(similarity, rows, cols):
        if backend == "triton":
            raise RuntimeError(_GRAD_ERROR)
        return False
    return chosen


_GRAD_ERROR = (
    "the fused AVSL distance (objretrieval.kernels.avsl) is inference only: autograd is recording and inputs "
    "or reliability parameters require gradients; run it under torch.no_grad() (or torch.inference_mode()), "
    "or use backend='torch' to train"
)


# ------------------------------------------------------------------------------------------ torch reference
def _node_distance(x: Tensor, y: Tensor, p: float) -> Tensor:
    """|x - y|^p, as the model's inference path computes it (in place where it can)."""
    diff = x - y
    return diff.square_() if p == 2.0 else diff.abs_().pow_(p)


def _torch_block(ops: PropagationOperands, rows: slice, paired: bool) -> Tensor:
    """Distances of a chunk of rows against every column ((r, C)), or against their own columns ((r,))."""

    def columns(t: Tensor) -> Tensor:  # (C, E) -> the side that pairs with (r, 1, E) rows
        return t[rows, None, :] if paired else t[None, :, :]

    hat = _node_distance(ops.rows[rows, None, 0], columns(ops.cols[:, 0]), ops.p)
    for lv in range(1, ops.rows.shape[1]):
        trans = (hat.flatten(0, 1) @ ops.weights[lv - 1]).view_as(hat)
        prob = (ops.rows_reliability[rows, None, lv - 1] * columns(ops.cols_certainty[:, lv - 1])).add_(
            ops.bias[lv - 1]
        )
        diff = _node_distance(ops.rows[rows, None, lv], columns(ops.cols[:, lv]), ops.p)
        hat = diff.sub_(trans).mul_(prob.sigmoid_()).add_(trans)  # P * D + (1 - P) * T
    out = hat.sum(-1)
    return out.squeeze(1) if paired else out


def _torch_distances(ops: PropagationOperands, paired: bool, chunk_size: int | None) -> Tensor:
    num_rows, cols, dim = ops.rows.shape[0], (1 if paired else ops.cols.shape[0]), ops.rows.shape[2]
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // (cols * dim))
    return torch.cat([_torch_block(ops, slice(i, i + chunk), paired) for i in range(0, num_rows, chunk)])


# ------------------------------------------------------------------------------------------- Triton kernel
def _avsl_tile(
    x_ptr,
    y_ptr,
    xr_ptr,
    yc_ptr,
    bias_ptr,
    w_ptr,
    out_ptr,
    scratch_ptr,
    num_rows,
    num_cols,
    dim,
    p,
    num_tiles,
    col_tiles,
    NUM_LEVELS: tl.constexpr,
    NUM_BUFFERS: tl.constexpr,
    PAIRED: tl.constexpr,
    POWER: tl.constexpr,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Triton kernel body: a persistent program looping over pair tiles; jitted by :data:`_triton_kernel`.

    Operands as :class:`PropagationOperands`; ``POWER`` is 2 for p = 2, 1 for p = 1 and 0 for any other p
    (computed as exp2(p * log2|d|)). Triton inlines only jitted helpers, so the |x - y|^p of the two places
    it is needed is written out twice.
    """
    PAIRS: tl.constexpr = TILE_R * TILE_C
    pid = tl.program_id(0)
    pair = tl.arange(0, PAIRS)
    buffer_size = PAIRS * dim
    own = scratch_ptr + pid.to(tl.int64) * (NUM_BUFFERS * buffer_size)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        if PAIRED:  # pair q of the tile is (row q, column q)
            rows = tile * PAIRS + pair
            cols = rows
            row_ok = rows < num_rows
            col_ok = row_ok
        else:
            rows = (tile // col_tiles) * TILE_R + pair // TILE_C
            cols = (tile % col_tiles) * TILE_C + pair % TILE_C
            row_ok, col_ok = rows < num_rows, cols < num_cols
        # (image, level, node) operands: 64-bit image offsets, then level and node offsets within an image
        row_at = rows.to(tl.int64)[:, None] * (NUM_LEVELS * dim)
        col_at = cols.to(tl.int64)[:, None] * (NUM_LEVELS * dim)
        row_rel = rows.to(tl.int64)[:, None] * ((NUM_LEVELS - 1) * dim)
        col_rel = cols.to(tl.int64)[:, None] * ((NUM_LEVELS - 1) * dim)
        total = tl.zeros((PAIRS,), dtype=tl.float32)
        for lv in tl.static_range(1, NUM_LEVELS):
            for n0 in range(0, dim, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                n_ok = n < dim
                row_n, col_n = row_ok[:, None] & n_ok[None, :], col_ok[:, None] & n_ok[None, :]
                # T = D^_{lv-1} @ W_lv for this block of high-level nodes, over blocks of low-level nodes
                trans = tl.zeros((PAIRS, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, dim, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < dim
                    if lv == 1:  # D^_0 = D_0, recomputed from the embeddings rather than stored
                        low = tl.load(
                            x_ptr + row_at + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                        ) - tl.load(
                            y_ptr + col_at + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
                        )
                        if POWER == 2:
                            low = low * low
                        elif POWER == 1:
                            low = tl.abs(low)
                        else:
                            low = tl.exp2(p * tl.log2(tl.abs(low)))
                    else:  # D^_{lv-1}, written by the previous level into this program's scratch rows
                        src = own + ((lv - 2) % 2) * buffer_size + pair[:, None] * dim + k[None, :]
                        low = tl.load(src, mask=k_ok[None, :], other=0.0)
                    w = tl.load(
                        w_ptr + (lv - 1) * dim * dim + k[:, None] * dim + n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    trans = tl.dot(low, w, trans, input_precision=PRECISION)
                diff = tl.load(x_ptr + row_at + lv * dim + n[None, :], mask=row_n, other=0.0) - tl.load(
                    y_ptr + col_at + lv * dim + n[None, :], mask=col_n, other=0.0
                )
                if POWER == 2:
                    diff = diff * diff
                elif POWER == 1:
                    diff = tl.abs(diff)
                else:
                    diff = tl.exp2(p * tl.log2(tl.abs(diff)))
                logit = tl.load(xr_ptr + row_rel + (lv - 1) * dim + n[None, :], mask=row_n, other=0.0)
                logit = logit * tl.load(yc_ptr + col_rel + (lv - 1) * dim + n[None, :], mask=col_n, other=0.0)
                logit = logit + tl.load(bias_ptr + (lv - 1) * dim + n, mask=n_ok, other=0.0)[None, :]
                hat = (diff - trans) * tl.sigmoid(logit) + trans  # P * D + (1 - P) * T
                if lv == NUM_LEVELS - 1:  # the last level is only ever summed over its nodes
                    total += tl.sum(tl.where(n_ok[None, :], hat, 0.0), axis=1)
                else:
                    dst = own + ((lv - 1) % 2) * buffer_size + pair[:, None] * dim + n[None, :]
                    tl.store(dst, hat, mask=n_ok[None, :])
            tl.debug_barrier()  # this level's scratch writes are seen by every thread before the next reads
        if PAIRED:
            tl.store(out_ptr + rows, total, mask=row_ok)
        else:
            tl.store(out_ptr + rows.to(tl.int64) * num_cols + cols, total, mask=row_ok & col_ok)


_triton_kernel = jit(_avsl_tile)


def _programs(device: torch.device, num_tiles: int) -> int:
    if device.type == "cuda":
        return min(
            num_tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        )
    return min(num_tiles, INTERPRETER_PROGRAMS)


def _triton_distances(ops: PropagationOperands, paired: bool) -> Tensor:
    num_rows, num_levels, dim = ops.rows.shape
    num_cols = ops.cols.shape[0]
    device = ops.rows.device
    pairs = TILE_R * TILE_C
    if paired:
        out = torch.empty(num_rows, dtype=torch.float32, device=device)
        col_tiles, num_tiles = 1, -(-num_rows // pairs)
    else:
        out = torch.empty(num_rows, num_cols, dtype=torch.float32, device=device)
        col_tiles = -(-num_cols // TILE_C)
        num_tiles = -(-num_rows // TILE_R) * col_tiles
    programs = _programs(device, num_tiles)
    buffers = min(2, num_levels - 2)  # D^_1 .. D^_{L-2} pass through scratch, two at a time
    scratch = torch.empty(max(1, programs * buffers * pairs * dim), dtype=torch.float32, device=device)
    power = 2 if ops.p == 2.0 else 1 if ops.p == 1.0 else 0
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    _triton_kernel()[(programs,)](
        ops.rows,
        ops.cols,
        ops.rows_reliability,
        ops.cols_certainty,
        ops.bias,
        ops.weights,
        out,
        scratch,
        num_rows,
        num_cols,
        dim,
        float(ops.p),
        num_tiles,
        col_tiles,
        NUM_LEVELS=num_levels,
        NUM_BUFFERS=max(1, buffers),
        PAIRED=paired,
        POWER=power,
        TILE_R=TILE_R,
        TILE_C=TILE_C,
        BLOCK_K=BLOCK_K,
        BLOCK_N=BLOCK_N,
        PRECISION="tf32" if tf32 else "ieee",
    )
    return out


# ------------------------------------------------------------------------------------------------- public
def avsl_distance(
    similarity: AttributableSimilarity,
    rows: AVSLFeatures,
    cols: AVSLFeatures,
    weights: Tensor | None = None,
    *,
    paired: bool = False,
    backend: KernelBackend = "torch",
    chunk_size: int | None = None,
) -> Tensor:
    """AVSL's final distances without the per-node (R, C, E) tensors; inference only.

    Args:
        similarity: the :class:`~objretrieval.models.AttributableSimilarity` (gamma, p, reliabilities, links).
        rows: features of R images (any floating dtype).
        cols: features of C images, on the rows' device.
        weights: (L-1, E, E) propagation weights, default ``similarity.propagation_weights()`` (pass them
            when calling block after block, as :class:`~objretrieval.models.AVSLScorer` does).
        paired: score row i against column i only (R == C): (R,) distances.
        backend: ``"torch"`` (the chunked reference), ``"triton"`` (the kernel: CUDA tensors, or CPU tensors
            with ``TRITON_INTERPRET=1``) or ``"auto"`` (the kernel only on a CUDA device where the GPU
            benchmark measured it faster, see :mod:`objretrieval.kernels.dispatch`).
        chunk_size: rows per chunk of the torch reference (default: 2**23 elements per (chunk, C, E) tensor).

    Returns:
        (R, C) float32 distances (smaller is more similar), or (R,) when ``paired``.

    Raises:
        RuntimeError: when autograd is recording and an input or a reliability parameter requires grad.
    """
    from objretrieval.models.avsl import _check_features

    _check_features(rows, "rows", similarity.num_levels, similarity.embed_dim)
    _check_features(cols, "cols", similarity.num_levels, similarity.embed_dim)
    if paired and len(rows) != len(cols):
        raise ValueError(f"paired needs as many rows as cols, got {len(rows)} and {len(cols)}")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    if _requires_grad(similarity, rows, cols):
        raise RuntimeError(_GRAD_ERROR)
    kernel = resolve_backend("avsl_distance", backend, rows.embeddings[0].device) == "triton"
    return fused_distances(
        similarity, rows, cols, weights, paired=paired, kernel=kernel, chunk_size=chunk_size
    )


def fused_distances(
    similarity: AttributableSimilarity,
    rows: AVSLFeatures,
    cols: AVSLFeatures,
    weights: Tensor | None = None,
    *,
    paired: bool = False,
    kernel: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`avsl_distance` on inputs its caller has already checked (the model and the scorer, block after
    block): ``kernel`` picks the Triton kernel, else the chunked torch reference."""
    if len(rows) == 0 or len(cols) == 0:
        shape = (len(rows),) if paired else (len(rows), len(cols))
        return torch.zeros(shape, device=rows.embeddings[0].device)
    with torch.no_grad():
        ops = propagation_operands(similarity, rows, cols, weights)
        return _triton_distances(ops, paired) if kernel else _torch_distances(ops, paired, chunk_size)
