"""Tiled pairwise losses with their backward: O(B x tile) memory instead of the (B, B) similarity matrix.

``tiled_contrastive_loss``, ``tiled_multi_similarity_loss`` (with the multi-similarity miner's rule inside) and
``tiled_supcon_loss`` compute the losses of :class:`~objretrieval.losses.ContrastiveLoss`,
:class:`~objretrieval.losses.MultiSimilarityLoss` and :class:`~objretrieval.losses.SupConLoss` over a batch's
own pairs (cosine similarities of the L2-normalised embeddings, self-pairs excluded, labels compared tile by
tile), as flash-attention computes attention:

1. a pass over the tiles of ``S = E E^T`` keeps per-row statistics only: for the miner, each anchor's hardest
   positive and negative; then the loss's row sums, counts or log-sum-exps (online, with a running max);
2. the loss is a few O(B) operations on those statistics, and so is whether the batch is empty by the rule of
   the loss class's dense path (``return_empty``);
3. the backward recomputes each tile, turns it into the per-pair coefficients ``G = dL/dS`` from the row
   statistics and accumulates ``dL/dE = (G + G^T) E`` (``2 G E`` for the contrastive loss, whose ``G`` is
   symmetric) without ever holding ``G``.

Two implementations of the tile steps share everything else:

- ``"torch"``: row panels of ``tile_size`` rows against all columns, on any device, in the compute dtype
  (float32; float64 stays float64, for gradient checks); the reference of the kernels;
- ``"triton"``: a statistics kernel (one program per row tile) and a gradient kernel (one per row tile and
  feature block), each looping over the column tiles with ``tl.dot`` (float32 accumulation, ``tf32x3``
  products: float32 accuracy on tensor cores); float32 only.

``backend`` is resolved by :func:`~objretrieval.kernels.dispatch.resolve_backend` under the kernel name
``"pairwise_loss"``: ``"auto"`` runs the torch panels, CPU always, until a GPU benchmark measures the kernel
faster.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from objretrieval._validation import (
    check_choice,
    check_embeddings,
    check_labels,
    check_number,
    check_positive_int,
)
from objretrieval.kernels.dispatch import KernelBackend, jit, resolve_backend
from objretrieval.losses.base import Reduction, masked_log1p_sum_exp, reduction_divisor
from objretrieval.precision import full_precision, upcast

try:  # Triton ships with torch's Linux wheels; without it only the torch reference runs
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover
    tl = None

#: Rows per panel of the torch path: a (256, B) float32 panel is 1 MiB per 1,024 columns.
DEFAULT_TORCH_TILE = 256
#: Largest (and default) rows / columns per Triton tile; ``tile_size`` is rounded down to a power of two.
MAX_TRITON_TILE = 64
#: Smallest Triton tile (``tl.dot`` needs 16).
MIN_TRITON_TILE = 16
#: Feature chunk of the Triton similarity products, the largest feature block of a gradient program (each
#: block recomputes its tiles' similarities) and the warps of a gradient program. Untuned: no GPU run yet.
_BLOCK_K, _MAX_BLOCK_D, _GRAD_WARPS = 32, 128, 8

# Kernel switch values: which loss a kernel computes (``LOSS: tl.constexpr``).
_CONTRASTIVE, _MULTI_SIMILARITY, _SUPCON, _MINING = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------------
# The losses: row statistics of one panel (torch), the loss from the statistics, the per-pair coefficients.
# ----------------------------------------------------------------------------------------------------------


class _Contrastive:
    """Row statistics: hinge sum, violating count and pair count, of the positives then the negatives."""

    kind, width, symmetric, mines = _CONTRASTIVE, 6, True, False

    def __init__(self, pos_margin: float, neg_margin: float, reduction: Reduction) -> None:
        self.params = (pos_margin, neg_margin, 0.0, 0.0)
        self.reduction = reduction

    def torch_stats(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None) -> Tensor:
        m_pos, m_neg = self.params[:2]
        pos_active, neg_active = pos & (s < m_pos), neg & (s > m_neg)
        columns = []
        for active, mask, hinge in ((pos_active, pos, m_pos - s), (neg_active, neg, s - m_neg)):
            columns += [torch.where(active, hinge, 0.0).sum(1), active.sum(1), mask.sum(1)]
        return torch.stack([c.to(s.dtype) for c in columns], 1)

    def empty(self, stats: Tensor, labels: Tensor, mining: Tensor | None) -> Tensor:
        """No positive and no negative pair (the dense path's None): never for B >= 2, whose other samples are
        all one or the other, so a constant (no device sync)."""
        return torch.zeros((), dtype=torch.bool, device=stats.device)

    def _divisors(self, totals: Tensor) -> tuple[Tensor, Tensor]:
        return (
            reduction_divisor(self.reduction, totals[1], totals[2]),
            reduction_divisor(self.reduction, totals[4], totals[5]),
        )

    def value(self, stats: Tensor, labels: Tensor) -> Tensor:
        totals = stats.sum(0, dtype=torch.float64)  # float64: counts beyond 2**24 pairs stay exact
        div_pos, div_neg = self._divisors(totals)
        return (totals[0] / div_pos + totals[3] / div_neg).to(stats.dtype)

    def row_constants(self, stats: Tensor, labels: Tensor, grad: Tensor) -> Tensor:
        """(B, 2): the coefficient of a violating positive pair, of a violating negative pair."""
        div_pos, div_neg = self._divisors(stats.sum(0, dtype=torch.float64))
        constants = torch.stack([-grad / div_pos.to(grad.dtype), grad / div_neg.to(grad.dtype)])
        return constants.to(stats.dtype).expand(stats.shape[0], 2).contiguous()

    def torch_coefficients(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None, c: Tensor):
        m_pos, m_neg = self.params[:2]
        return torch.where(pos & (s < m_pos), c[:, :1], torch.where(neg & (s > m_neg), c[:, 1:], 0.0)).to(
            s.dtype
        )


def _mine(
    s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None, epsilon: float
) -> tuple[Tensor, Tensor]:
    """The multi-similarity miner's pairs: positives below the hardest negative + epsilon, negatives above the
    hardest positive - epsilon (``mining``: each row's hardest positive and negative similarity)."""
    if mining is None:
        return pos, neg
    hardest_pos, hardest_neg = mining[:, :1], mining[:, 1:]
    return pos & (s - epsilon < hardest_neg), neg & (s + epsilon > hardest_pos)


class _Mining:
    """Row statistics of the miner: the smallest positive similarity (inf: none), the largest negative one."""

    kind, width = _MINING, 2

    def __init__(self) -> None:
        self.params = (0.0, 0.0, 0.0, 0.0)

    def torch_stats(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None) -> Tensor:
        hardest_pos = torch.where(pos, s, float("inf")).amin(1)
        return torch.stack([hardest_pos, torch.where(neg, s, float("-inf")).amax(1)], 1)


class _MultiSimilarity:
    """Row statistics: ``log(1 + sum exp)`` of the (mined) positive terms and of the negative terms."""

    kind, width, symmetric = _MULTI_SIMILARITY, 2, False

    def __init__(
        self, alpha: float, beta: float, base: float, epsilon: float | None, reduction: Reduction
    ) -> None:
        self.params = (alpha, beta, base, 0.0 if epsilon is None else epsilon)
        self.mines = epsilon is not None
        self.reduction = reduction

    def torch_stats(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None) -> Tensor:
        alpha, beta, base, epsilon = self.params
        pos, neg = _mine(s, pos, neg, mining, epsilon)
        pos_lse = masked_log1p_sum_exp(-alpha * (s - base), pos)
        return torch.stack([pos_lse, masked_log1p_sum_exp(beta * (s - base), neg)], 1)

    def empty(self, stats: Tensor, labels: Tensor, mining: Tensor | None) -> Tensor:
        """No (mined) positive and no (mined) negative pair (the dense path's None). Unmined never, for B >= 2.
        The miner's rule is monotone in S, so a row keeps some pair iff it keeps its hardest positive or its
        hardest negative: the rule itself (:func:`_mine`), applied to those two "pairs" of each row."""
        if mining is None:
            return torch.zeros((), dtype=torch.bool, device=stats.device)
        # the columns of mining: each row's least similar positive, its most similar negative
        hardest_pos = torch.tensor([[True, False]], device=mining.device)
        pos, neg = _mine(mining, hardest_pos, ~hardest_pos, mining, self.params[3])
        return ~(pos.any() | neg.any())

    def _per_anchor(self, stats: Tensor) -> Tensor:
        alpha, beta = self.params[:2]
        return stats[:, 0] / alpha + stats[:, 1] / beta

    def _divisor(self, per_anchor: Tensor) -> Tensor:
        return reduction_divisor(self.reduction, (per_anchor > 0).sum(), per_anchor.shape[0])

    def value(self, stats: Tensor, labels: Tensor) -> Tensor:
        per_anchor = self._per_anchor(stats)
        return per_anchor.sum() / self._divisor(per_anchor)

    def row_constants(self, stats: Tensor, labels: Tensor, grad: Tensor) -> Tensor:
        """(B, 3): the two log-sum-exps and the scale ``grad / divisor``."""
        scale = (grad / self._divisor(self._per_anchor(stats))).expand(stats.shape[0], 1)
        return torch.cat([stats, scale.to(stats.dtype)], 1).contiguous()

    def torch_coefficients(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None, c: Tensor):
        # d/dS of (1/alpha) log(1 + sum exp(-alpha (S - base))) is -exp(-alpha (S - base) - lse): a softmax
        alpha, beta, base, epsilon = self.params
        pos, neg = _mine(s, pos, neg, mining, epsilon)
        pos_coef = -c[:, 2:] * torch.exp(-alpha * (s - base) - c[:, :1])
        neg_coef = c[:, 2:] * torch.exp(beta * (s - base) - c[:, 1:2])
        return torch.where(pos, pos_coef, torch.where(neg, neg_coef, 0.0))


class _SupCon:
    """Row statistics: log-sum-exp of ``S / T`` over the other samples, positive count, sum of positive logits."""

    kind, width, symmetric, mines = _SUPCON, 3, False, False

    def __init__(self, temperature: float) -> None:
        self.params = (temperature, 0.0, 0.0, 0.0)

    def torch_stats(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None) -> Tensor:
        logits = s / self.params[0]
        lse = torch.logsumexp(logits.masked_fill(~(pos | neg), float("-inf")), 1)
        return torch.stack([lse, pos.sum(1).to(s.dtype), torch.where(pos, logits, 0.0).sum(1)], 1)

    def _per_anchor(self, stats: Tensor) -> Tensor:
        num_pos = stats[:, 1]
        return torch.where(num_pos > 0, stats[:, 0] - stats[:, 2] / num_pos.clamp(min=1), 0.0)

    def empty(self, stats: Tensor, labels: Tensor, mining: Tensor | None) -> Tensor:
        """No positive pair (all labels distinct) or no negative one (one class): nothing to contrast, the dense
        path's None."""
        return ~stats[:, 1].any() | (labels == labels[0]).all()

    def _weights(self, stats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Each anchor's loss and its weight in the mean over the anchors with a positive loss (PML's
        ``AvgNonZeroReducer``); all weights 0 for an empty batch (:meth:`empty`), where PML returns 0."""
        per_anchor = self._per_anchor(stats)
        nonzero = (per_anchor > 0) & ~self.empty(stats, labels, None)  # a tensor rule: no device sync
        return per_anchor, nonzero.to(stats.dtype) / nonzero.sum().clamp(min=1)

    def value(self, stats: Tensor, labels: Tensor) -> Tensor:
        per_anchor, weights = self._weights(stats, labels)
        return (per_anchor * weights).sum()

    def row_constants(self, stats: Tensor, labels: Tensor, grad: Tensor) -> Tensor:
        """(B, 3): the log-sum-exp, ``a = grad * weight / T`` (softmax scale), ``a / num_pos`` (positive)."""
        a = grad * self._weights(stats, labels)[1] / self.params[0]
        return torch.stack([stats[:, 0], a, a / stats[:, 1].clamp(min=1)], 1).to(stats.dtype).contiguous()

    def torch_coefficients(self, s: Tensor, pos: Tensor, neg: Tensor, mining: Tensor | None, c: Tensor):
        softmax = c[:, 1:2] * torch.exp(s / self.params[0] - c[:, :1])
        return torch.where(pos | neg, softmax - torch.where(pos, c[:, 2:], 0.0), 0.0)


_Loss = _Contrastive | _MultiSimilarity | _SupCon

# ----------------------------------------------------------------------------------------------------------
# Torch tiles: row panels of tile rows against every column.
# ----------------------------------------------------------------------------------------------------------


def _panels(e: Tensor, labels: Tensor, tile: int):
    """(rows, S panel, positive mask, negative mask) for each panel of ``tile`` rows; self-pairs in neither."""
    columns = torch.arange(e.shape[0], device=e.device)
    for start in range(0, e.shape[0], tile):
        rows = slice(start, min(start + tile, e.shape[0]))
        same = labels[rows, None] == labels[None, :]
        not_self = columns[rows, None] != columns[None, :]
        yield rows, e[rows] @ e.T, same & not_self, ~same


def _torch_stats(loss: Any, e: Tensor, labels: Tensor, mining: Tensor | None, tile: int) -> Tensor:
    """(B, loss.width) row statistics, panel by panel."""
    parts = [
        loss.torch_stats(s, pos, neg, None if mining is None else mining[rows])
        for rows, s, pos, neg in _panels(e, labels, tile)
    ]
    return torch.cat(parts)


def _torch_grad(
    loss: _Loss, e: Tensor, labels: Tensor, mining: Tensor | None, constants: Tensor, tile: int
) -> Tensor:
    """``(G + G^T) E``, one panel of ``G`` at a time."""
    grad = torch.zeros_like(e)
    for rows, s, pos, neg in _panels(e, labels, tile):
        g = loss.torch_coefficients(s, pos, neg, None if mining is None else mining[rows], constants[rows])
        if loss.symmetric:
            grad[rows] += 2.0 * (g @ e)
        else:
            grad[rows] += g @ e
            grad += g.T @ e[rows]
    return grad


# ----------------------------------------------------------------------------------------------------------
# Triton tiles. Both kernels walk the column tiles with _pair_tile, which reaches them as their PAIRS
# argument (a kernel calls only jitted functions, and ours are made on first use: see dispatch.jit).
# ----------------------------------------------------------------------------------------------------------


def _pair_tile(
    e_ptr, y_ptr, rows, rows64, row_ok, y_rows, start, n, d, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr
):
    """The (BLOCK, BLOCK) cosine similarities of a row tile against the column tile at ``start`` (float32
    accumulation, tf32x3 products), and its positive and negative pair masks (self-pairs and padding out)."""
    cols = start + tl.arange(0, BLOCK)
    col_ok = cols < n
    cols64 = cols.to(tl.int64)
    s = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, d, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        a = tl.load(
            e_ptr + rows64[:, None] * d + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < d), other=0.0
        )
        b = tl.load(
            e_ptr + cols64[:, None] * d + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < d), other=0.0
        )
        s += tl.dot(a, tl.trans(b), input_precision="tf32x3")
    y_cols = tl.load(y_ptr + cols64, mask=col_ok, other=0)
    valid = row_ok[:, None] & col_ok[None, :]
    same = y_rows[:, None] == y_cols[None, :]
    pos = valid & same & (rows[:, None] != cols[None, :])
    neg = valid & ~same
    return cols64, col_ok, s, pos, neg


def _stats_tile(
    e_ptr,
    y_ptr,
    mining_ptr,
    out_ptr,
    n,
    d,
    p0,
    p1,
    p2,
    p3,
    LOSS: tl.constexpr,
    MINED: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """Row statistics of one row tile, over every column tile (online log-sum-exps); see the torch twins."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    y_rows = tl.load(y_ptr + rows64, mask=row_ok, other=0)
    if MINED:
        hardest_pos = tl.load(mining_ptr + rows64 * 2, mask=row_ok, other=0.0)
        hardest_neg = tl.load(mining_ptr + rows64 * 2 + 1, mask=row_ok, other=0.0)
    zero = tl.zeros((BLOCK,), dtype=tl.float32)
    # accumulators; their meaning depends on LOSS (the order of the torch twin's columns)
    a0, a1, a2, a3, a4, a5 = zero, zero, zero, zero, zero, zero
    if LOSS == 1:  # log(1 + sum exp): running max 0 and sum 1 stand for the "1"
        a1 += 1.0
        a3 += 1.0
    if LOSS == 2:  # log-sum-exp: running max -inf, sum 0
        a0 += float("-inf")
    if LOSS == 3:
        a0 += float("inf")
        a1 += float("-inf")
    for start in range(0, n, BLOCK):
        _, _, s, pos, neg = PAIRS(e_ptr, y_ptr, rows, rows64, row_ok, y_rows, start, n, d, BLOCK, BLOCK_K)
        if MINED:  # the multi-similarity miner's pairs (_mine)
            pos = pos & (s - p3 < hardest_neg[:, None])
            neg = neg & (s + p3 > hardest_pos[:, None])
        if LOSS == 0:
            pos_on = pos & (s < p0)
            neg_on = neg & (s > p1)
            a0 += tl.sum(tl.where(pos_on, p0 - s, 0.0), 1)
            a1 += tl.sum(pos_on.to(tl.float32), 1)
            a2 += tl.sum(pos.to(tl.float32), 1)
            a3 += tl.sum(tl.where(neg_on, s - p1, 0.0), 1)
            a4 += tl.sum(neg_on.to(tl.float32), 1)
            a5 += tl.sum(neg.to(tl.float32), 1)
        if LOSS == 1:  # (a0, a1): running max and sum of the positive terms; (a2, a3): the negative ones
            x = tl.where(pos, -p0 * (s - p2), float("-inf"))
            new_max = tl.maximum(a0, tl.max(x, 1))
            a1 = a1 * tl.exp(a0 - new_max) + tl.sum(tl.exp(x - new_max[:, None]), 1)
            a0 = new_max
            x = tl.where(neg, p1 * (s - p2), float("-inf"))
            new_max = tl.maximum(a2, tl.max(x, 1))
            a3 = a3 * tl.exp(a2 - new_max) + tl.sum(tl.exp(x - new_max[:, None]), 1)
            a2 = new_max
        if (
            LOSS == 2
        ):  # (a0, a1): running max and sum of exp(S / T) over pairs; a2, a3: positive count, logits
            logits = s / p0
            x = tl.where(pos | neg, logits, float("-inf"))
            new_max = tl.maximum(a0, tl.max(x, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a tile without pairs adds nothing
            a1 = a1 * tl.exp(a0 - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
            a0 = new_max
            a2 += tl.sum(pos.to(tl.float32), 1)
            a3 += tl.sum(tl.where(pos, logits, 0.0), 1)
        if LOSS == 3:
            a0 = tl.minimum(a0, tl.min(tl.where(pos, s, float("inf")), 1))
            a1 = tl.maximum(a1, tl.max(tl.where(neg, s, float("-inf")), 1))
    out = out_ptr + rows64 * WIDTH
    if LOSS == 0:
        tl.store(out + 0, a0, mask=row_ok)
        tl.store(out + 1, a1, mask=row_ok)
        tl.store(out + 2, a2, mask=row_ok)
        tl.store(out + 3, a3, mask=row_ok)
        tl.store(out + 4, a4, mask=row_ok)
        tl.store(out + 5, a5, mask=row_ok)
    if LOSS == 1:
        tl.store(out + 0, a0 + tl.log(a1), mask=row_ok)
        tl.store(out + 1, a2 + tl.log(a3), mask=row_ok)
    if LOSS == 2:  # (a padded row has no pair: a sum of 0)
        tl.store(out + 0, a0 + tl.log(tl.where(row_ok, a1, 1.0)), mask=row_ok)
        tl.store(out + 1, a2, mask=row_ok)
        tl.store(out + 2, a3, mask=row_ok)
    if LOSS == 3:
        tl.store(out + 0, a0, mask=row_ok)
        tl.store(out + 1, a1, mask=row_ok)


def _grad_tile(
    e_ptr,
    y_ptr,
    mining_ptr,
    c_ptr,
    out_ptr,
    n,
    d,
    p0,
    p1,
    p2,
    p3,
    scale,
    LOSS: tl.constexpr,
    MINED: tl.constexpr,
    WIDTH: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """One (row tile, feature block) of ``G E`` (or, ``TRANSPOSED``, of ``G^T E``: the tile's rows are then
    the references and the columns the anchors, whose row constants it reads), times ``scale``; the
    transposed pass adds to what the first one stored."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < n, dims < d
    rows64 = rows.to(tl.int64)
    y_rows = tl.load(y_ptr + rows64, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols64, col_ok, s, pos, neg = PAIRS(
            e_ptr, y_ptr, rows, rows64, row_ok, y_rows, start, n, d, BLOCK, BLOCK_K
        )
        # the anchors' row constants, broadcast along the tile's other axis
        if TRANSPOSED:
            anchor, anchor_ok = cols64, col_ok
        else:
            anchor, anchor_ok = rows64, row_ok
        c0 = tl.load(c_ptr + anchor * WIDTH, mask=anchor_ok, other=0.0)
        c1 = tl.load(c_ptr + anchor * WIDTH + 1, mask=anchor_ok, other=0.0)
        if LOSS != 0:
            c2 = tl.load(c_ptr + anchor * WIDTH + 2, mask=anchor_ok, other=0.0)
        if MINED:
            m0 = tl.load(mining_ptr + anchor * 2, mask=anchor_ok, other=0.0)
            m1 = tl.load(mining_ptr + anchor * 2 + 1, mask=anchor_ok, other=0.0)
        if TRANSPOSED:
            c0, c1 = c0[None, :], c1[None, :]
            if LOSS != 0:
                c2 = c2[None, :]
            if MINED:
                m0, m1 = m0[None, :], m1[None, :]
        else:
            c0, c1 = c0[:, None], c1[:, None]
            if LOSS != 0:
                c2 = c2[:, None]
            if MINED:
                m0, m1 = m0[:, None], m1[:, None]
        if MINED:
            pos = pos & (s - p3 < m1)
            neg = neg & (s + p3 > m0)
        if LOSS == 0:
            g = tl.where(pos & (s < p0), c0, tl.where(neg & (s > p1), c1, 0.0))
        if LOSS == 1:
            pos_coef = -c2 * tl.exp(-p0 * (s - p2) - c0)
            neg_coef = c2 * tl.exp(p1 * (s - p2) - c1)
            g = tl.where(pos, pos_coef, tl.where(neg, neg_coef, 0.0))
        if LOSS == 2:
            softmax = c1 * tl.exp(s / p0 - c0)
            g = tl.where(pos | neg, softmax - tl.where(pos, c2, 0.0), 0.0)
        other = tl.load(
            e_ptr + cols64[:, None] * d + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
        )
        acc += tl.dot(g, other, input_precision="tf32x3")
    out = out_ptr + rows64[:, None] * d + dims[None, :]
    out_ok = row_ok[:, None] & dim_ok[None, :]
    acc = acc * scale
    if TRANSPOSED:
        acc += tl.load(out, mask=out_ok, other=0.0)
    tl.store(out, acc, mask=out_ok)


_stats_kernel = jit(_stats_tile)
_grad_kernel = jit(_grad_tile)
_pair_kernel = jit(_pair_tile)


def _triton_stats(loss: Any, e: Tensor, labels: Tensor, mining: Tensor | None, tile: int) -> Tensor:
    out = torch.empty(e.shape[0], loss.width, dtype=torch.float32, device=e.device)
    _stats_kernel()[(-(-e.shape[0] // tile),)](
        e,
        labels,
        e if mining is None else mining,  # an unused pointer when not MINED
        out,
        e.shape[0],
        e.shape[1],
        *loss.params,
        LOSS=loss.kind,
        MINED=mining is not None,
        WIDTH=loss.width,
        BLOCK=tile,
        BLOCK_K=_BLOCK_K,
        PAIRS=_pair_kernel(),
    )
    return out


def _triton_grad(
    loss: _Loss, e: Tensor, labels: Tensor, mining: Tensor | None, constants: Tensor, tile: int
) -> Tensor:
    grad = torch.empty_like(e)
    block_d = min(_MAX_BLOCK_D, max(16, 1 << (e.shape[1] - 1).bit_length()))
    grid = (-(-e.shape[0] // tile), -(-e.shape[1] // block_d))
    for transposed in (False,) if loss.symmetric else (False, True):
        _grad_kernel()[grid](
            e,
            labels,
            e if mining is None else mining,
            constants,
            grad,
            e.shape[0],
            e.shape[1],
            *loss.params,
            2.0 if loss.symmetric else 1.0,
            LOSS=loss.kind,
            MINED=mining is not None,
            WIDTH=constants.shape[1],
            TRANSPOSED=transposed,
            BLOCK=tile,
            BLOCK_K=_BLOCK_K,
            BLOCK_D=block_d,
            PAIRS=_pair_kernel(),
            num_warps=_GRAD_WARPS,  # a (tile, BLOCK_D) float32 accumulator per program
        )
    return grad


# ----------------------------------------------------------------------------------------------------------
# The autograd function and the public functions.
# ----------------------------------------------------------------------------------------------------------


class _TiledPairLoss(torch.autograd.Function):
    """A pairwise loss of normalised embeddings whose forward keeps O(B) statistics and whose backward
    recomputes the similarity tiles. Outputs the loss and whether the batch is empty by the rule of the loss
    class's dense path (each loss's ``empty``, from the same statistics; not differentiable)."""

    @staticmethod
    def forward(
        ctx: Any, e: Tensor, labels: Tensor, loss: _Loss, backend: str, tile: int
    ) -> tuple[Tensor, Tensor]:
        stats_of, grad_of = (
            (_triton_stats, _triton_grad) if backend == "triton" else (_torch_stats, _torch_grad)
        )
        with full_precision(e.device):
            mining = stats_of(_Mining(), e, labels, None, tile) if loss.mines else None
            stats = stats_of(loss, e, labels, mining, tile).to(e.dtype)
        ctx.save_for_backward(e, labels, mining, stats)
        ctx.loss, ctx.grad_of, ctx.tile = loss, grad_of, tile
        empty = loss.empty(stats, labels, mining)  # stays on the device: read only under return_empty
        ctx.mark_non_differentiable(empty)
        return loss.value(stats, labels), empty

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, _grad_empty: Any) -> tuple[Tensor | None, ...]:
        e, labels, mining, stats = ctx.saved_tensors
        with full_precision(e.device):
            constants = ctx.loss.row_constants(stats, labels, grad.to(e.dtype))
            grad_e = ctx.grad_of(ctx.loss, e, labels, mining, constants, ctx.tile)
        return grad_e, None, None, None, None


def _prepare(embeddings: Any, labels: Any, tile_size: int | None, backend: KernelBackend):
    """Validated, normalised embeddings in the compute dtype, int64 labels, the backend and its tile."""
    x = check_embeddings(embeddings, "embeddings")
    if x.shape[0] < 2:
        raise ValueError(f"embeddings must have at least 2 rows to form a pair, got shape {tuple(x.shape)}")
    y = check_labels(labels, "labels", x.shape[0], "embeddings").to(x.device).contiguous()
    run = resolve_backend("pairwise_loss", backend, x.device)
    with full_precision(x.device):
        e = F.normalize(upcast(x), dim=1).contiguous()
    if run == "triton" and e.dtype != torch.float32:
        raise TypeError(
            "backend='triton' computes in float32 and takes float16, bfloat16 or float32 embeddings, got "
            f"{x.dtype}; float64 runs on backend='torch'"
        )
    if tile_size is None:
        tile = DEFAULT_TORCH_TILE if run == "torch" else MAX_TRITON_TILE
    else:
        tile = check_positive_int(tile_size, "tile_size")
    if run == "triton":  # a power of two in [16, 64]: what tl.dot and the registers of one program take
        tile = max(MIN_TRITON_TILE, 1 << (min(tile, MAX_TRITON_TILE).bit_length() - 1))
    return e, y, run, tile


def _apply(e: Tensor, labels: Tensor, loss: _Loss, run: str, tile: int, return_empty: bool) -> Any:
    value, empty = _TiledPairLoss.apply(e, labels, loss, run, tile)
    return (value, bool(empty)) if return_empty else value


def tiled_contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    pos_margin: float = 1.0,
    neg_margin: float = 0.5,
    reduction: Reduction = "mean_nonzero",
    tile_size: int | None = None,
    backend: KernelBackend = "torch",
    return_empty: bool = False,
) -> Any:
    """:class:`~objretrieval.losses.ContrastiveLoss` of a batch's own pairs in O(B x tile_size) memory.

    ``mean_{S_ij < m+} (m+ - S_ij) + mean_{S_ij > m-} (S_ij - m-)`` over the positive / negative pairs
    (cosine similarities, self-pairs excluded), each half reduced on its own (``reduction``).

    Args:
        embeddings: (B, D) floating, B >= 2; L2-normalised here.
        labels: (B,) integer class labels.
        pos_margin: similarity positive pairs should exceed, in [-1, 1].
        neg_margin: similarity negative pairs should stay below, in [-1, 1].
        reduction: per half, ``"mean_nonzero"`` (over the violating pairs), ``"mean"`` or ``"sum"``.
        tile_size: rows per tile (default: 256 rows per torch panel, 64 for Triton, whose tiles are a power
            of two in [16, 64]).
        backend: ``"torch"`` (row panels, any device), ``"triton"`` (the kernel: CUDA tensors, or CPU tensors
            under ``TRITON_INTERPRET=1``) or ``"auto"``.
        return_empty: also return whether the batch offered no pair to learn from, by the rule of the loss
            class's dense path, which then warns and counts it (``MetricLoss.num_empty_batches``).

    Returns:
        The scalar loss (float32; float64 for float64 embeddings on the torch path); with ``return_empty``,
        ``(loss, empty)``.
    """
    loss = _Contrastive(
        check_number(pos_margin, "pos_margin", low=-1.0, high=1.0),
        check_number(neg_margin, "neg_margin", low=-1.0, high=1.0),
        check_choice(reduction, "reduction", Reduction),
    )
    e, y, run, tile = _prepare(embeddings, labels, tile_size, backend)
    return _apply(e, y, loss, run, tile, return_empty)


def tiled_multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    mining_epsilon: float | None = None,
    reduction: Reduction = "mean",
    tile_size: int | None = None,
    backend: KernelBackend = "torch",
    return_empty: bool = False,
) -> Any:
    """:class:`~objretrieval.losses.MultiSimilarityLoss` of a batch's own pairs in O(B x tile_size) memory.

    Per anchor ``(1/alpha) log(1 + sum_pos e^{-alpha (S - base)}) + (1/beta) log(1 + sum_neg e^{beta (S -
    base)})``, averaged over the anchors (``reduction``). With ``mining_epsilon``, only the pairs
    :class:`~objretrieval.miners.MultiSimilarityMiner` ``(epsilon=mining_epsilon)`` keeps: positives with
    ``S_ap - epsilon < max_n S_an`` and negatives with ``S_an + epsilon > min_p S_ap``, per anchor.

    Args:
        embeddings: (B, D) floating, B >= 2; L2-normalised here.
        labels: (B,) integer class labels.
        alpha: positive-pair scale (> 0).
        beta: negative-pair scale (> 0).
        base: similarity offset, in [-1, 1].
        mining_epsilon: the miner's margin (>= 0), or None for every pair.
        reduction: over anchors, ``"mean"``, ``"mean_nonzero"`` or ``"sum"``.
        tile_size: rows per tile (see :func:`tiled_contrastive_loss`).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (see :func:`tiled_contrastive_loss`).
        return_empty: also return whether the batch is empty (see :func:`tiled_contrastive_loss`).

    Returns:
        The scalar loss; with ``return_empty``, ``(loss, empty)``.
    """
    epsilon = None if mining_epsilon is None else check_number(mining_epsilon, "mining_epsilon", low=0.0)
    loss = _MultiSimilarity(
        check_number(alpha, "alpha", low=0.0, low_open=True),
        check_number(beta, "beta", low=0.0, low_open=True),
        check_number(base, "base", low=-1.0, high=1.0),
        epsilon,
        check_choice(reduction, "reduction", Reduction),
    )
    e, y, run, tile = _prepare(embeddings, labels, tile_size, backend)
    return _apply(e, y, loss, run, tile, return_empty)


def tiled_supcon_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    tile_size: int | None = None,
    backend: KernelBackend = "torch",
    return_empty: bool = False,
) -> Any:
    """Supervised contrastive loss (pytorch-metric-learning's ``SupConLoss``) in O(B x tile_size) memory.

    Anchor ``i`` with positives ``P(i)`` contributes ``logsumexp_{j != i} S_ij / T - mean_{p in P(i)} S_ip / T``;
    the loss is the mean over the anchors with a positive loss; 0 (with a zero gradient) when the batch has
    no positive or no negative pair, as PML's.

    Args:
        embeddings: (B, D) floating, B >= 2; L2-normalised here.
        labels: (B,) integer class labels.
        temperature: the softmax temperature ``T`` (> 0).
        tile_size: rows per tile (see :func:`tiled_contrastive_loss`).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (see :func:`tiled_contrastive_loss`).
        return_empty: also return whether the batch is empty (see :func:`tiled_contrastive_loss`).

    Returns:
        The scalar loss; with ``return_empty``, ``(loss, empty)``.
    """
    loss = _SupCon(check_number(temperature, "temperature", low=0.0, low_open=True))
    e, y, run, tile = _prepare(embeddings, labels, tile_size, backend)
    return _apply(e, y, loss, run, tile, return_empty)


def tiled_options(
    backend: Any, tiled: Any, tile_size: Any, label_comparison: Any
) -> tuple[KernelBackend, bool, int | None]:
    """A loss class's ``(backend, whether it takes the tiled path, tile_size)``, checked: ``tiled=True`` or a
    backend other than ``"torch"`` selects the tiled path, which compares labels by equality only."""
    backend = check_choice(backend, "backend", KernelBackend)
    if not isinstance(tiled, bool):
        raise TypeError(f"tiled must be a bool, got {type(tiled).__name__}")
    tile_size = None if tile_size is None else check_positive_int(tile_size, "tile_size")
    use_tiles = tiled or backend != "torch"
    if use_tiles and label_comparison is not None:
        raise ValueError(
            f"label_comparison: the tiled path (tiled=True or backend={backend!r}) compares labels by "
            "equality; pass label_comparison=None or use backend='torch', tiled=False"
        )
    return backend, use_tiles, tile_size


def check_tiled_call(loss: Any, embeddings: Any, labels: Any, **unsupported: Any) -> None:
    """Refuse what a loss class's tiled path cannot take (``ref_emb``, ``indices_tuple``, ...), by name, then
    what its dense path refuses, in the dense path's order: bad embeddings, bad labels, a batch of one class
    (the tiled function validates them again, a pass over the embeddings; the order keeps each message true:
    wrong-length labels are not "a batch of one class")."""
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(
                f"{name}: the tiled {type(loss).__name__} (tiled=True or backend={loss.backend!r}) computes "
                f"the loss of the batch's own pairs only; pass {name}=None or use backend='torch', tiled=False"
            )
    x = check_embeddings(embeddings, "embeddings")
    y = check_labels(labels, "labels", x.shape[0], "embeddings")
    if loss.needs_two_classes and not bool((y != y[0]).any()):
        loss.refuse_one_class(y.shape[0])
