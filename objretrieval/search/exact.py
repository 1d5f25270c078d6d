"""Exact top-k: fast products screen the pairs, exact scores rank the few that can still enter the top-k.

Matrix products round differently with their shapes, block sizes, thread counts and devices (MKL picks
other kernels for other shapes; cuBLAS splits sums; bfloat16 keeps 8 bits), so a ranking read off their
output lets near-ties and duplicates fall either way. Here products only *screen*: every screened score
``s`` lies within a rigorous bound ``E`` (:class:`Screen`) of the pair's **exact score** ``c``
(:func:`exact_scores`: float32 products summed in one fixed pairwise order per dimension, hence the same
bits on every device, for any block layout, in any process). A pair of a block is scored exactly only if
``s + E`` can still reach the running k-th exact score of its row (:class:`ExactTopK`); the kept top-k is
the top-k of exact scores, ties to the lower index.

So the result does not depend on the precision of the products (``"float32"`` or ``"bf16-exact"``), block
sizes, the number of processes or the device, and costs one exact score per pair that comes within ``E``
of a row's running k-th: for float32 products ``E`` is about ``D 2^-24 |q||g|`` (a handful of pairs per
row), for bfloat16 about ``2^-8 |q||g|`` (tens of pairs per row on real embeddings). :class:`SearchStats`
counts them.

:class:`ExactRanks` ranks the whole gallery by the same exact scores (``map``, ``mrr``): a screened pair
counts as above or below a relevant item of exact score ``c`` when ``s - E > c`` or ``s + E < c``, and only
the pairs in between are scored exactly.

Bound of a screened score (u = 2^-24, u_b = 2^-8, gamma_n = n u / (1 - n u), L = ceil(log2 D)):

- float32, inner product: ``|s - c| <= (gamma_D + gamma_{L+1}) |q| |g|`` (any summation order of the
  product, and the exact score's own pairwise sum);
- bfloat16, inner product, with ``q' = bf16(q)``, ``dq = q - q'`` (likewise g): ``q'.g' - q.g = -dq.g - q'.dg``,
  so ``|q'.g' - q.g| <= |dq||g| + |q'||dg|``; products of bf16 numbers are exact in float32 and summed in
  float32 (``gamma_D |q'||g'|``); the product's output is rounded once to bfloat16, a relative error
  ``u_b / (1 - u_b)`` of the value itself, applied entry by entry to the threshold;
- L2: the same for ``2 q.g`` plus the rounding of the norms, of the shift to the common origin and of the
  three-term sum, all below ``(gamma_{D+4} + 4u) (|q| + |g|)^2``.

Every bound takes row norms against the block's largest gallery norms, and a 0.1 % slack for the rounding
of those norms. The bfloat16 bound
assumes what oneDNN (AVX-512 BF16 / AMX) and cuBLAS do: float32 accumulation, one rounding of the output;
on CUDA the screening turns off TF32 and cuBLAS's reduced-precision bf16 reductions for its products.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from objretrieval._validation import check_choice
from objretrieval.search.scoring import (
    METRICS,
    Metric,
    Prepared,
    buffer_view,
    gram_scores,
    mask_excluded,
    prepared_blocks,
    score_block,
)
from objretrieval.search.sources import BlockSource
from objretrieval.search.topk import score_index_keys, sort_by_score_then_index

Precision = Literal["float32", "bf16-exact"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

_U = 2.0**-24  # float32 unit roundoff
_U_BF16 = 2.0**-8  # bfloat16 unit roundoff
#: Covers the float32 rounding of the norms the bounds are computed from (relative error <= gamma_D).
_SLACK = 1.001
#: Elements of the (pairs, D) product buffer of one exact-scoring step (4 MiB in float32: it stays in cache).
_EXACT_ELEMENTS = 1 << 20
#: Columns per chunk when a block is searched for entries above a threshold (see :func:`entries_at_least`).
_CHUNK = 16


def _gamma(n: int) -> float:
    return n * _U / (1.0 - n * _U)


@dataclass
class SearchStats:
    """What an exact search did; pass one as ``knn(..., stats=SearchStats())`` to have it filled in.

    Attributes:
        precision: the precision of the screening products.
        queries: query rows searched.
        screened: (query, gallery) pairs given a screened score.
        rescored: pairs scored exactly because they could still enter a top-k.
    """

    precision: str = "float32"
    queries: int = 0
    screened: int = 0
    rescored: int = 0

    @property
    def rescored_per_query(self) -> float:
        """Exact scores computed per query (at least ``k``)."""
        return self.rescored / max(1, self.queries)


def exact_scores(x: Tensor, y: Tensor, metric: Metric) -> Tensor:
    """(P,) exact scores of the row pairs ``(x[i], y[i])``, "higher is better" (minus the squared distance
    for L2), float32.

    Float32 products (L2: squared float32 differences) summed by halving the row in place: a fixed pairwise
    order for each dimension D, made of elementwise operations only, so a pair gets the same bits whatever
    the batch, the device or the process; the error is at most ``gamma_{ceil(log2 D)+1}`` times the sum of
    absolute terms (a matrix product's: ``gamma_D``).

    Raises:
        ValueError, TypeError: unless ``x`` and ``y`` are float32 tensors of one (P, D) shape and device and
            ``metric`` is one of ``"cosine"``, ``"ip"``, ``"l2"``.
    """
    metric = check_choice(metric, "metric", METRICS)
    for t, name in ((x, "x"), (y, "y")):
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.dim() != 2:
            raise TypeError(
                f"{name} must be a (P, D) float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}"
            )
    if x.shape != y.shape or x.device != y.device:
        raise ValueError(
            f"x and y must pair row by row: got {tuple(x.shape)} on {x.device}, {tuple(y.shape)} on {y.device}"
        )
    return exact_pair_scores(x, y, torch.arange(len(x), device=x.device), None, metric)


def check_stats(stats: object) -> None:
    """Refuse a ``stats=`` argument that is not a :class:`SearchStats` (or None)."""
    if stats is not None and not isinstance(stats, SearchStats):
        raise TypeError(f"stats must be a SearchStats or None, got {type(stats).__name__}")


def exact_pair_scores(x: Tensor, y: Tensor, rows: Tensor, cols: Tensor | None, metric: Metric) -> Tensor:
    """(P,) :func:`exact_scores` of the pairs ``(x[rows[i]], y[cols[i]])`` (``cols=None``: ``y[rows[i]]``),
    gathered a few hundred pairs at a time so that operands stay in cache."""
    out = torch.empty(len(rows), dtype=torch.float32, device=x.device)
    d = x.shape[1]
    step = max(1, _EXACT_ELEMENTS // max(1, d))
    for i in range(0, len(rows), step):
        r = rows[i : i + step]
        a = x.index_select(0, r)
        b = y.index_select(0, r if cols is None else cols[i : i + step])
        p = a.sub_(b).square_() if metric == "l2" else a.mul_(b)
        w = d
        while w > 1:
            half = w // 2
            if w % 2:
                p[:, :1] += p[:, w - 1 : w]
            p[:, :half] += p[:, half : 2 * half]
            w = half
        out[i : i + step] = p[:, 0]
    return out.neg_() if metric == "l2" else out


@dataclass(frozen=True)
class ScreenRows:
    """Rows ready for screening: the prepared float32 rows (also the exact scores' points), their bfloat16
    copy for ``"bf16-exact"``, and the norms the bounds need."""

    prepared: Prepared
    norms: Tensor  # |v| of the scored vectors (shifted ones for L2)
    low: Tensor | None = None  # bf16(v)
    low_norms: Tensor | None = None  # |bf16(v)|
    residual_norms: Tensor | None = None  # |v - bf16(v)|

    def __len__(self) -> int:
        return len(self.prepared)

    def rows(self, start: int, stop: int) -> ScreenRows:
        return self.select(slice(start, stop))

    def select(self, index: slice | Tensor) -> ScreenRows:
        """The rows at ``index`` (a slice, or a tensor of row numbers)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        p = self.prepared
        if isinstance(index, slice):
            prepared = p.rows(index.start, index.stop)
        else:
            prepared = Prepared(p.vectors[index], cut(p.sq_norms), p.origin, cut(p.unshifted))
        return ScreenRows(
            prepared, self.norms[index], cut(self.low), cut(self.low_norms), cut(self.residual_norms)
        )

    @functools.cached_property
    def maxima(self) -> tuple[float, float, float]:
        """The largest ``|v|``, ``|bf16(v)|`` and ``|v - bf16(v)|`` (0 for missing ones): a gallery block's part
        of the bounds, computed once per block."""

        def top(t: Tensor | None) -> float:
            return float(t.max()) if t is not None and t.numel() else 0.0

        return top(self.norms), top(self.low_norms), top(self.residual_norms)

    @property
    def points(self) -> Tensor:
        return self.prepared.points

    def wide(self) -> ScreenRows:
        """These rows for float32 screening (the bfloat16 copy dropped)."""
        return ScreenRows(self.prepared, self.norms)

    @property
    def operand(self) -> Tensor:
        """What the screening products read: the bfloat16 copy, else the prepared float32 rows."""
        return self.prepared.vectors if self.low is None else self.low


@dataclass(frozen=True)
class Screen:
    """Screening products of one precision for one metric, with the bound of their error (module docs)."""

    metric: Metric
    precision: Precision = "float32"

    def rows(self, p: Prepared, name: str = "embeddings", offset: int = 0) -> ScreenRows:
        """The screening view of prepared rows.

        Raises:
            ValueError: if a row is so large that its float32 scores would overflow.
        """
        v = p.vectors
        norms = torch.linalg.vector_norm(v, dim=1)
        too_large = ~torch.isfinite((2.0 * norms).square())  # scores reach |q||g|, L2 (|q| + |g|)^2
        if bool(too_large.any()):
            row = int(too_large.nonzero()[0])
            raise ValueError(
                f"{name} row {row + offset} has norm {float(norms[row]):.3g}: float32 scores of such rows overflow "
                "(rows up to about 9e18 in norm, measured from the L2 origin, can be searched); scale the data"
            )
        if self.precision == "float32":
            return ScreenRows(p, norms)
        low = v.to(torch.bfloat16)
        wide = low.float()
        return ScreenRows(
            p,
            norms,
            low,
            torch.linalg.vector_norm(wide, dim=1),
            torch.linalg.vector_norm(v - wide, dim=1),
        )

    def scores(self, q: ScreenRows, g: ScreenRows, out: Tensor | None = None) -> Tensor:
        """(len(q), len(g)) screened scores, higher is better (float32, or bfloat16 for inner products)."""
        if self.precision == "float32":
            with _bounded_products(q.norms.device):
                if self.metric != "l2":
                    return score_block(q.prepared, g.prepared, self.metric, out=out)
                # the Gram formula alone: its cancellation is inside the bound, the exact scores correct it
                return gram_scores(q.prepared, g.prepared, buffer_view(out, (len(q), len(g)), torch.float32))
        assert q.low is not None and g.low is not None
        with _bounded_products(q.low.device):
            s = torch.mm(q.low, g.low.T, out=buffer_view(out, (len(q), len(g)), torch.bfloat16))
        if self.metric != "l2":
            return s
        assert q.prepared.sq_norms is not None and g.prepared.sq_norms is not None
        wide = s.float().mul_(2.0)
        return wide.sub_(g.prepared.sq_norms).sub_(q.prepared.sq_norms[:, None])

    def buffer(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """Scratch memory for one screened block, reused across blocks (fresh memory costs page faults)."""
        dtype = torch.bfloat16 if self.precision == "bf16-exact" else torch.float32
        return torch.empty(rows * cols, dtype=dtype, device=device)

    def bounds(self, q: ScreenRows, g: ScreenRows, *, float32_output: bool = False) -> tuple[Tensor, float]:
        """``(E, r)``: (len(q),) float64 absolute bounds of ``|screened - exact|`` against this gallery block,
        and the relative part ``r`` (bfloat16 inner products: ``|s - c| <= E + r |s|``).

        ``float32_output``: the products of bfloat16 inputs come out in float32 (a fused kernel), without the
        rounding of a bfloat16 output.
        """
        d = q.prepared.vectors.shape[1]
        depth = max(1, math.ceil(math.log2(max(d, 1)))) + 1
        gn, g_low, g_res = g.maxima
        qn = q.norms.double()
        tiny = d * 2.0**-124  # flushed subnormal products
        if self.precision == "float32":
            if self.metric == "l2":
                e = (_gamma(d + 4) + _gamma(depth + 2) + 4 * _U) * (qn + gn).square()
            else:
                e = (_gamma(d) + _gamma(depth)) * qn * gn
            return _SLACK * e + tiny, 0.0
        assert q.low_norms is not None and q.residual_norms is not None
        assert g.low_norms is not None and g.residual_norms is not None
        q_low, q_res = q.low_norms.double(), q.residual_norms.double()
        dot = q_res * gn + q_low * g_res + (_gamma(d) + _gamma(depth)) * (q_low * g_low + qn * gn)
        rel = 0.0 if float32_output else _U_BF16 / (1.0 - _U_BF16)
        if self.metric != "l2":
            return _SLACK * dot + tiny, _SLACK * rel
        # 2 q.g from a bf16-rounded product, bounded with |q'||g'| instead of entry by entry
        e = (
            2.0 * (dot + rel * q_low * g_low)
            + (_gamma(d + 4) + _gamma(depth + 2) + 8 * _U) * (qn + gn).square()
        )
        return _SLACK * e + tiny, 0.0


@contextlib.contextmanager
def _bounded_products(device: torch.device) -> Iterator[None]:
    """Products the bounds hold for: on CUDA, no TF32 for float32 (10-bit inputs) and no bf16 partial sums
    (cuBLAS's split-K reductions), whatever the caller's settings."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    flags = matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = flags


def thresholds(kth: Tensor, bound: tuple[Tensor, float]) -> Tensor:
    """(rows,) float32 screened-score thresholds: a pair below its row's can no longer reach ``kth``.

    Keep ``s`` if ``s + r |s| + E >= kth``: with ``t = kth - E``, that is ``s >= t / (1 + r)`` for ``t > 0``
    and ``s >= t / (1 - r)`` otherwise; computed in float64 and rounded down to float32. Rows without a k-th
    yet (``-inf``) keep everything.
    """
    e, relative = bound
    t = kth.double() - e.to(kth.device)
    if relative:
        t = torch.where(t > 0, t / (1.0 + relative), t / (1.0 - relative))
    t32 = t.float()
    return torch.where(t32.double() > t, torch.nextafter(t32, torch.full_like(t32, float("-inf"))), t32)


class ColumnGroups(NamedTuple):
    """The columns of a block in ``number`` groups of ``size`` (group j: columns ``j * stride + t * step``),
    laid out so that their maxima reduce along the block's memory order, and those maxima."""

    maxima: Tensor  # (rows, number)
    number: int
    size: int
    stride: int
    step: int

    @staticmethod
    def of(block: Tensor) -> ColumnGroups | None:
        """Groups of ``_CHUNK`` columns (None for blocks under twice that, searched whole). A row-major block groups
        every ``number``-th column (an outer reduction: vectorised, also for bfloat16); a transposed view
        groups consecutive columns, which are rows of the matrix it views."""
        n_cols = block.shape[1]
        if n_cols < 2 * _CHUNK:
            return None
        number = n_cols // _CHUNK
        width = number * _CHUNK
        if block.stride(0) == 1 and block.stride(1) != 1:  # transposed view: reduce over its rows instead
            maxima = block.T[:width].unflatten(0, (number, _CHUNK)).amax(dim=1).T
            return ColumnGroups(maxima, number, _CHUNK, _CHUNK, 1)
        maxima = block[:, :width].unflatten(1, (_CHUNK, number)).amax(dim=1)
        return ColumnGroups(maxima, number, _CHUNK, 1, number)

    @property
    def width(self) -> int:
        return self.number * self.size


def entries_at_least(
    block: Tensor, threshold: Tensor, groups: ColumnGroups | None = None
) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the finite entries of ``block`` at or above their row's ``threshold``, row-major.

    Looks only inside the column groups whose maximum passes (:class:`ColumnGroups`): few do once a row's
    top-k has filled. ``block`` may be a transposed view of a contiguous matrix.
    """
    n_cols = block.shape[1]
    device = block.device
    groups = ColumnGroups.of(block) if groups is None else groups
    parts: list[tuple[Tensor, Tensor]] = []
    start = 0
    if groups is not None:
        start = groups.width
        hit_rows, hit_groups = (groups.maxima >= _at_most(threshold, block.dtype)[:, None]).nonzero(
            as_tuple=True
        )
        if hit_rows.numel():
            cols = (
                hit_groups[:, None] * groups.stride + torch.arange(groups.size, device=device) * groups.step
            )
            if _dense(block):
                flat = block.as_strided((block.numel(),), (1,), block.storage_offset())
                at = (hit_rows[:, None] * block.stride(0) + cols * block.stride(1)).flatten()
                values = flat.index_select(0, at).view(cols.shape)
            else:
                values = block[hit_rows[:, None], cols]
            keep = (values >= threshold[hit_rows, None]) & (values > float("-inf"))
            parts.append((torch.masked_select(hit_rows[:, None], keep), torch.masked_select(cols, keep)))
    if start < n_cols:
        tail = block[:, start:]
        r, c = ((tail >= threshold[:, None]) & (tail > float("-inf"))).nonzero(as_tuple=True)
        parts.append((r, c + start))
    if not parts:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty
    rows, cols = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    order = torch.argsort(rows, stable=True)
    return rows[order], cols[order]


def _at_most(threshold: Tensor, dtype: torch.dtype) -> Tensor:
    """``threshold`` in ``dtype``, never above it (one ulp lower when rounding went up): comparing in the
    block's own dtype avoids converting every entry."""
    if dtype == threshold.dtype:
        return threshold
    low = threshold.to(dtype)
    up = low.float() > threshold
    return torch.where(up, (threshold - threshold.abs() * 2.0**-7).to(dtype), low)


def _dense(block: Tensor) -> bool:
    """Whether ``block`` is a matrix or the transpose of one, whose elements fill ``numel`` slots."""
    s0, s1 = block.stride()
    return (s1 == 1 and s0 == block.shape[1]) or (s0 == 1 and s1 == block.shape[0])


class ExactTopK:
    """The best ``k`` (exact score, index) pairs per row over screened blocks; O(rows x k) memory.

    Each :meth:`update` scores exactly the block's pairs that can still enter a row's top-k (their screened
    score plus its bound reaches the row's running k-th exact score); a row not yet full takes (a bound of) the
    block's own k-th screened score as its k-th. The running k-th only rises, so every pair of the final top-k is scored
    exactly when its block passes: the result is the exact top-k (module docs).

    Args:
        num_rows: number of query rows.
        k: neighbours kept per row.
        device: where the state lives.
        stats: optional :class:`SearchStats` to count the pairs screened and rescored.
    """

    def __init__(self, num_rows: int, k: int, device: torch.device, stats: SearchStats | None = None) -> None:
        self.k = k
        self.scores = torch.full((num_rows, k), float("-inf"), dtype=torch.float32, device=device)
        self.indices = torch.full((num_rows, k), -1, dtype=torch.int64, device=device)
        self.stats = stats

    def update(
        self,
        row_start: int,
        block: Tensor,
        col_offset: int,
        row_points: Tensor,
        col_points: Tensor,
        metric: Metric,
        bound: tuple[Tensor, float],
    ) -> None:
        """Merge a screened (rows, cols) block whose rows start at ``row_start`` and columns at ``col_offset``.

        Args:
            block: screened scores (may be a transposed view); -inf marks excluded pairs.
            row_points: the points of the block's rows, for :func:`exact_scores`.
            col_points: the points of the block's columns.
            metric: the metric of the exact scores.
            bound: :meth:`Screen.bounds` of these rows against these columns.
        """
        n_rows, n_cols = block.shape
        rows = slice(row_start, row_start + n_rows)
        if self.stats is not None:
            self.stats.screened += n_rows * n_cols
        groups = ColumnGroups.of(block)
        kth = self.scores[rows, -1]
        open_rows = (kth == float("-inf")).nonzero().squeeze(1)
        if open_rows.numel():  # not yet full: after this block, the row's k-th is at least the block's own
            kth = kth.clone()
            kth[open_rows] = self._block_kth(block, groups, open_rows, bound)
        r, c = entries_at_least(block, thresholds(kth, bound), groups)
        _Scorer(self, rows, col_offset, row_points, col_points, metric)(r, c)

    def _block_kth(
        self, block: Tensor, groups: ColumnGroups | None, rows: Tensor, bound: tuple[Tensor, float]
    ) -> Tensor:
        """A lower bound of each row's k-th exact score within the block (-inf where the block has fewer than
        k finite entries for that row): its k-th largest group maximum (k groups hold an entry at least that
        large) or, with fewer than k groups, its k-th screened score; minus the bound."""
        if block.shape[1] < self.k:
            return torch.full((len(rows),), float("-inf"), device=block.device)
        if groups is not None and groups.number >= self.k:
            source = groups.maxima[rows]
        else:
            source = block if rows.numel() == block.shape[0] else block[rows]
        kth = source.topk(self.k, dim=1, sorted=False).values.amin(dim=1).double()
        e, relative = bound
        low = kth - e[rows].to(kth.device)
        if relative:  # (a row with fewer than k finite entries keeps -inf: 0 x inf would be NaN)
            low = low - relative * kth.abs()
        return low.float()


class _Scorer:
    """Exact scores of one block's candidate pairs, merged into the state's rows."""

    def __init__(
        self,
        state: ExactTopK,
        rows: slice,
        col_offset: int,
        row_points: Tensor,
        col_points: Tensor,
        metric: Metric,
    ) -> None:
        self.state, self.rows, self.col_offset = state, rows, col_offset
        self.row_points, self.col_points, self.metric = row_points, col_points, metric

    def __call__(self, r: Tensor, c: Tensor) -> None:
        """Score the pairs ``(r, c)`` (local row, column; sorted by row) and merge them."""
        if r.numel() == 0:
            return
        st = self.state
        exact = exact_pair_scores(self.row_points, self.col_points, r, c, self.metric)
        if st.stats is not None:
            st.stats.rescored += r.numel()
        n_rows = self.rows.stop - self.rows.start
        counts = torch.bincount(r, minlength=n_rows)
        touched = counts.nonzero().squeeze(1)
        local = (torch.cumsum(counts > 0, 0) - 1)[r]
        slot = torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]
        width = int(counts.max())
        values = torch.full((len(touched), width), float("-inf"), device=r.device)
        cols = torch.full((len(touched), width), -1, dtype=torch.int64, device=r.device)
        values[local, slot] = exact
        cols[local, slot] = c + self.col_offset
        at = touched + self.rows.start
        merged_scores, merged_indices = sort_by_score_then_index(
            torch.cat([st.scores[at], values], dim=1), torch.cat([st.indices[at], cols], dim=1)
        )
        st.scores[at] = merged_scores[:, : st.k]
        st.indices[at] = merged_indices[:, : st.k]


class ExactRanks:
    """Rank of each row's relevant items among all gallery items by exact score, counted over screened
    blocks: the whole ranking that ``map`` and ``mrr`` need, in O(rows x P) memory.

    For a relevant item of exact score ``c``, a block entry of screened score ``s`` and bound ``E`` is
    certainly ranked above it if ``s - E > c`` and certainly not if ``s + E < c`` (:func:`thresholds`, both
    ways); only the entries in between, within reach of some relevant item (the relevant items themselves,
    whose keys are known, and near-ties), need their exact score, and the (exact score descending, index
    ascending) order decides. With the relevant items sorted by that order, each entry is ranked above a
    prefix of them (worst first): one ``searchsorted`` per entry places it, and a histogram of the places,
    summed over blocks (and over processes), gives every rank. Ranks therefore do not depend on the screening
    precision, block sizes or the number of processes.

    Args:
        scores: (rows, P) exact scores (:func:`exact_pair_scores`) of each row's relevant items, any order.
        indices: (rows, P) their gallery indices; -1 marks an empty slot.
        stats: optional :class:`SearchStats` to count the pairs screened and rescored.
    """

    #: A bfloat16 block with more entries within reach than this share (beyond the relevant items
    #: themselves) is screened again in float32, and so are the blocks after it: an exact score costs about
    #: a hundred product entries, and a bfloat16 bound (``2^-8 |q||g|``) around each of P relevant scores
    #: covers much of a row when P is in the tens.
    FINER_SHARE = 1 / 256

    def __init__(self, scores: Tensor, indices: Tensor, stats: SearchStats | None = None) -> None:
        present = indices >= 0
        empty = torch.iinfo(torch.int64).max  # empty slots sort last in both orders
        keys = torch.where(present, score_index_keys(scores, indices), empty)
        self.keys, order = keys.sort(dim=1)  # ascending: the lowest-ranked relevant item first
        self.scores = torch.where(present, scores, float("inf")).gather(1, order)
        self.present = present.gather(1, order)
        # the same keys by gallery index, to look up a relevant item met again in the second pass
        self.ids, by_id = torch.where(present, indices, empty).sort(dim=1)
        self.id_keys = keys.gather(1, by_id)
        #: counts[i, p]: entries of row i ranked above exactly its p lowest-ranked relevant items
        self.counts = torch.zeros(
            (scores.shape[0], scores.shape[1] + 1), dtype=torch.int64, device=scores.device
        )
        self.stats = stats
        #: set once a bfloat16 block had too many entries within reach; later blocks screen in float32
        self.crowded = False

    def update(
        self,
        row_start: int,
        col_offset: int,
        q: ScreenRows,
        g: ScreenRows,
        screen: Screen,
        exclude: Tensor | None = None,
        out: Tensor | None = None,
    ) -> None:
        """Screen rows ``q`` (from ``row_start``) against gallery rows ``g`` (from ``col_offset``) and count.

        Args:
            exclude: (num_rows,) gallery index each row of the counter must not count, -1 for none.
            out: scratch memory for the screened block (:meth:`Screen.buffer`).
        """
        rows = slice(row_start, row_start + len(q))
        if self.stats is not None:
            self.stats.screened += len(q) * len(g)
        if screen.precision != "float32" and self.crowded:  # a bfloat16 block was too crowded: float32 now
            q, g, screen, out = q.wide(), g.wide(), Screen(screen.metric), None
        place, r, col = self._classify(rows, q, g, screen, exclude, row_start, col_offset, out)
        if screen.precision != "float32" and r.numel() > self._allowed(rows, col_offset, len(g)):
            self.crowded = True
            q, g, screen = q.wide(), g.wide(), Screen(screen.metric)
            place, r, col = self._classify(rows, q, g, screen, exclude, row_start, col_offset)
        if r.numel():
            key = self._keys_of(rows, r, col, col_offset, q.points, g.points, screen.metric)
            place[r, col] = self._place(self.keys[rows], r, place[r, col], key)
        width = self.keys.shape[1] + 1
        slots = place + torch.arange(0, len(q) * width, width, device=place.device)[:, None]
        self.counts[rows] += torch.bincount(slots.view(-1), minlength=len(q) * width).view(len(q), width)

    def _classify(
        self,
        rows: slice,
        q: ScreenRows,
        g: ScreenRows,
        screen: Screen,
        exclude: Tensor | None,
        row_start: int,
        col_offset: int,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, cols) relevant items each entry is certainly ranked above, and the entries within reach of
        the next one (row, column), whose exact score decides."""
        block = screen.scores(q, g, out=out)
        mask_excluded(block, exclude, row_start, col_offset)
        s = block.float().contiguous()
        e, relative = screen.bounds(q, g)
        bound = (e[:, None], relative)
        c = self.scores[rows]
        above = thresholds(-c, bound).neg_()  # s > above: exact > c
        # s < below: exact < c; clamped so that excluded (-inf) entries are never within reach
        below = thresholds(c, bound).clamp_(min=torch.finfo(torch.float32).min)
        below = torch.cat([below, below.new_full((len(q), 1), float("inf"))], dim=1)
        place = torch.searchsorted(above, s)
        r, col = (below.gather(1, place) <= s).nonzero(as_tuple=True)
        return place, r, col

    def _keys_of(
        self,
        rows: slice,
        r: Tensor,
        col: Tensor,
        col_offset: int,
        row_points: Tensor,
        col_points: Tensor,
        metric: Metric,
    ) -> Tensor:
        """Sort keys (:func:`score_index_keys`) of the block entries ``(r, col)``: looked up for relevant
        items, from exact scores for the others."""
        ids = col + col_offset
        known_ids = self.ids[rows]
        at = self._place(known_ids, r, torch.zeros_like(r), ids).clamp_(max=known_ids.shape[1] - 1)
        known = known_ids[r, at] == ids
        key = torch.where(known, self.id_keys[rows][r, at], 0)
        new = (~known).nonzero().squeeze(1)
        if new.numel():
            exact = exact_pair_scores(row_points, col_points, r[new], col[new], metric)
            key[new] = score_index_keys(exact, ids[new])
        if self.stats is not None:
            self.stats.rescored += new.numel()
        return key

    def _allowed(self, rows: slice, col_offset: int, n_cols: int) -> float:
        """Entries within reach that a bfloat16 block may have: its relevant items (gallery indices
        ``col_offset`` to ``col_offset + n_cols - 1``), which are looked up, plus ``FINER_SHARE``."""
        ids = self.ids[rows]
        bounds = torch.tensor([col_offset, col_offset + n_cols], device=ids.device).expand(len(ids), 2)
        inside = torch.searchsorted(ids, bounds.contiguous())
        return int((inside[:, 1] - inside[:, 0]).sum()) + self.FINER_SHARE * len(ids) * n_cols

    @staticmethod
    def _place(keys: Tensor, r: Tensor, start: Tensor, key: Tensor) -> Tensor:
        """How many of ``keys[r]`` (ascending rows) lie below ``key``, by bisection from ``start`` (a count
        already known to lie below)."""
        low, high = start, torch.full_like(start, keys.shape[1])
        for _ in range(keys.shape[1].bit_length()):
            mid = (low + high) // 2
            less = keys[r, mid.clamp(max=keys.shape[1] - 1)] < key
            open_ = low < high
            low = torch.where(open_ & less, mid + 1, low)
            high = torch.where(open_ & ~less, mid, high)
        return low

    def ranks(self) -> Tensor:
        """(rows, P) 1-based ranks of the relevant items (the counts of every block summed), worst first, 0 in
        empty slots."""
        ranked_above = self.counts.flip(1).cumsum(1).flip(1)[:, 1:]
        return torch.where(self.present, ranked_above + 1, 0)


def exact_topk_of_candidates(
    q: ScreenRows,
    g: ScreenRows,
    screened: Tensor,
    candidates: Tensor,
    k: int,
    screen: Screen,
    available: Tensor,
    stats: SearchStats | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The exact top-k of each query among its screened ``candidates``, and the queries it is not proven for.

    For screening that returns each row's best ``K'`` pairs at once (a fused kernel) rather than blocks: the
    candidates are scored exactly and ranked; a row is *certified* when ``K' >= available`` or its ``K'``-th
    screened score plus the bound stays below its k-th exact score, since every other pair screened at most
    that. The caller searches the other rows again (e.g. with the block engine).

    Args:
        q: the screening rows of the queries.
        g: the screening rows of the whole gallery.
        screened: (Q, K') screened scores, descending; -inf for a missing slot.
        candidates: (Q, K') gallery indices, -1 for a missing slot.
        k: neighbours per query (<= K').
        screen: the screening's precision and metric, for its bound.
        available: (Q,) gallery items each query may retrieve.
        stats: optional counts.

    Returns:
        (Q, k) exact scores and indices, and the (R,) int64 rows that are not certified.
    """
    n_rows, width = candidates.shape
    valid = candidates >= 0
    rows = torch.arange(n_rows, device=candidates.device)[:, None].expand_as(candidates)[valid]
    exact = torch.full(candidates.shape, float("-inf"), device=candidates.device)
    exact[valid] = exact_pair_scores(q.points, g.points, rows, candidates[valid], screen.metric)
    if stats is not None:
        stats.rescored += int(valid.sum())
    scores, indices = sort_by_score_then_index(exact, candidates)
    scores, indices = scores[:, :k].contiguous(), indices[:, :k].contiguous()
    last = screened[:, -1].double()
    e, relative = screen.bounds(q, g, float32_output=True)
    reach = last + e.to(last.device)
    if relative:
        reach = reach + relative * last.abs()
    # a missing last slot: the screening returned every pair the row may retrieve
    proven = (reach < scores[:, -1].double()) | (last == float("-inf")) | (width >= available.to(last.device))
    return scores, indices, (~proven).nonzero().squeeze(1)


def search_blocks(
    queries: Prepared,
    gallery: BlockSource,
    screen: Screen,
    state: ExactTopK,
    *,
    device: torch.device,
    query_block_size: int,
    exclude: Tensor | None = None,
    progress: bool = False,
) -> None:
    """Screen every (query block, gallery block) pair into ``state``; the gallery is read once, in order."""
    q = screen.rows(queries, "queries")
    buffer = screen.buffer(min(query_block_size, len(q)), gallery.block_size, device)
    for col_offset, block in prepared_blocks(gallery, screen.metric, device, queries, progress=progress):
        g = screen.rows(block, gallery.name, col_offset)
        for row_start in range(0, len(q), query_block_size):
            rows = q.rows(row_start, row_start + query_block_size)
            s = screen.scores(rows, g, out=buffer)
            mask_excluded(s, exclude, row_start, col_offset)
            state.update(
                row_start, s, col_offset, rows.points, g.points, screen.metric, screen.bounds(rows, g)
            )


def self_search(x: Prepared, screen: Screen, state: ExactTopK, block_size: int, progress: bool) -> None:
    """Leave-one-out over ``x``: each unordered block pair is screened once and serves both its row blocks."""
    from tqdm.auto import tqdm

    rows = screen.rows(x, "queries")
    n = len(rows)
    starts = range(0, n, block_size)
    pairs = [(a, c) for a in starts for c in starts if c >= a]
    buffer = screen.buffer(min(block_size, n), min(block_size, n), x.vectors.device)
    for a, c in tqdm(pairs, disable=not progress, desc="search", unit="block"):
        ra, rc = rows.rows(a, a + block_size), rows.rows(c, c + block_size)
        s = screen.scores(ra, rc, out=buffer)
        if a == c:
            s.fill_diagonal_(float("-inf"))
        state.update(a, s, c, ra.points, rc.points, screen.metric, screen.bounds(ra, rc))
        if c != a:
            state.update(c, s.T, a, rc.points, ra.points, screen.metric, screen.bounds(rc, ra))
