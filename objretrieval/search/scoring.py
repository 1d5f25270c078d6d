"""Block-wise similarity scores, always in float32 and always "higher is better".

Internally every metric is turned into a score to maximise: cosine and inner product as they are, L2 as the
negative squared Euclidean distance. Half-precision inputs are upcast before the matrix product so that sums
accumulate in float32.

Squared distances come from the Gram matrix, ``|x|^2 + |y|^2 - 2 x.y``: one matrix product, but for nearly
coincident points the three terms cancel and the rounding error of ``|x|^2 + |y|^2`` is all that is left.
:func:`near_pairs` finds the few pairs where that happens and :func:`exact_sq_distances` recomputes them from
the difference vectors, so every squared distance keeps a relative error below about 4e-5 in float32 (the
Gram formula alone: 3.6e-3 at distance 0.0044 between unit vectors). Uncentred data is measured from a
central point (:func:`l2_origin`), so that only true near duplicates need this. The losses' distances
(:meth:`objretrieval.batch.PairBatch.distances`) use the same two routines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval.search.sources import BlockSource

Metric = Literal["cosine", "ip", "l2"]
METRICS: tuple[str, ...] = get_args(Metric)

#: Squared distances below this fraction of ``|x|^2 + |y|^2`` are recomputed from the difference vectors. The
#: Gram formula's absolute error is at most about 10 u (|x|^2 + |y|^2) (u = 2^-24 in float32, measured up to
#: D = 768), so the pairs it keeps have relative error below 10 u / NEAR_FRACTION, about 4e-5.
NEAR_FRACTION = 2.0**-6
#: Elements of the (pairs, D) difference buffer of one rescoring step (64 MiB in float32).
_RESCORE_ELEMENTS = 1 << 24
#: Rows whose coordinate-wise median may become the origin of L2 vectors (the first ones, in query order).
ORIGIN_SAMPLE = 4096


@dataclass(frozen=True)
class Prepared:
    """Vectors ready for scoring: float32 on the compute device, normalised for cosine; for L2 measured from
    ``origin`` (None: from zero, see :func:`l2_origin`), with their squared norms and, if shifted, the
    unshifted vectors (``unshifted``), whose differences carry no rounding from the shift."""

    vectors: Tensor
    sq_norms: Tensor | None = None
    origin: Tensor | None = None
    unshifted: Tensor | None = None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def rows(self, start: int, stop: int) -> Prepared:
        sq = None if self.sq_norms is None else self.sq_norms[start:stop]
        unshifted = None if self.unshifted is None else self.unshifted[start:stop]
        return Prepared(self.vectors[start:stop], sq, self.origin, unshifted)

    @property
    def points(self) -> Tensor:
        """The vectors as given (normalised for cosine), for exact differences."""
        return self.vectors if self.unshifted is None else self.unshifted


def prepare(x: Tensor, metric: Metric, device: torch.device, like: Prepared | None = None) -> Prepared:
    """Prepare rows for :func:`score_block`; gallery rows pass the prepared queries as ``like``, so that for
    L2 both sides are measured from the same origin (chosen from the queries)."""
    x = x.to(device=device, dtype=torch.float32)
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    if metric != "l2":
        return Prepared(x)
    origin = l2_origin(x) if like is None else like.origin
    if origin is None:
        return Prepared(x, x.pow(2).sum(1))
    shifted = x - origin
    return Prepared(shifted, shifted.pow(2).sum(1), origin, x)


def l2_origin(x: Tensor) -> Tensor | None:
    """The point to measure L2 vectors from: the coordinate-wise median of the first rows, or None (zero).

    Distances do not change under a common translation, but the Gram formula's rounding error, and with it
    the share of pairs :func:`near_pairs` must recompute, grows with ``|x|^2 + |y|^2``. For data far from zero
    relative to its spread (uncentred features) almost every pair would be recomputed; measured from a
    central point, only near duplicates are. A median is a data value in each coordinate, so integer data
    stays exact. Data already around zero (normalised embeddings) keeps zero and pays nothing.
    """
    sample = x[:ORIGIN_SAMPLE]
    median = sample.median(dim=0).values
    spread = (sample - median).pow(2).sum(1).mean()
    return median if bool(median.pow(2).sum() > spread) else None


def score_block(q: Prepared, g: Prepared, metric: Metric, out: Tensor | None = None) -> Tensor:
    """(len(q), len(g)) float32 scores, higher is better; for L2, minus the squared distance.

    ``out`` is an optional buffer of at least that many elements, reused across blocks: writing into warm
    memory instead of a fresh allocation avoids page faults that cost about a fifth of the product's time.
    """
    buffer = buffer_view(out, (len(q), len(g)), torch.float32)
    if metric != "l2":
        return torch.mm(q.vectors, g.vectors.T, out=buffer)
    assert q.sq_norms is not None and g.sq_norms is not None
    s = gram_scores(q, g, buffer)
    rows, cols = near_pairs(s, q.sq_norms, g.sq_norms, negated=True)
    if rows.numel():
        s[rows, cols] = exact_sq_distances(q.points, g.points, rows, cols).neg_()
    return s


def gram_scores(q: Prepared, g: Prepared, out: Tensor | None = None) -> Tensor:
    """Minus the squared distances by the Gram formula alone, ``2 q.g - |g|^2 - |q|^2`` (L2 rows)."""
    assert q.sq_norms is not None and g.sq_norms is not None
    # the gallery term rides in the GEMM as a bias; one pass adds |q|^2
    s = torch.addmm(-g.sq_norms, q.vectors, g.vectors.T, alpha=2.0, out=out)
    return s.sub_(q.sq_norms[:, None])


def buffer_view(out: Tensor | None, shape: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
    """The first ``shape`` elements of the scratch buffer ``out`` as a matrix, or None (allocate) when there
    is no buffer, it is too small or of another dtype."""
    if out is None or out.dtype != dtype or out.numel() < shape[0] * shape[1]:
        return None
    return out[: shape[0] * shape[1]].view(shape)


def near_pairs(sq: Tensor, x_sq: Tensor, r_sq: Tensor, *, negated: bool = False) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the Gram-based squared distances that cancellation made imprecise.

    Args:
        sq: (N, M) squared distances ``|x_i|^2 + |r_j|^2 - 2 x_i.r_j`` (their negatives if ``negated``).
        x_sq: (N,) squared norms of the rows.
        r_sq: (M,) squared norms of the columns.
        negated: ``sq`` holds minus the squared distances (the search's "higher is better" scores).

    Returns:
        Row and column indices (int64, row-major order) of the pairs whose squared distance is below
        ``NEAR_FRACTION`` of ``|x_i|^2 + |r_j|^2``.
    """
    # Screen with one loose bound per row: first on each row's best entry (a cheap reduction; most rows of a
    # search have no near pair at all), then on the entries of the rows that passed, then the exact bound.
    row_bound = NEAR_FRACTION * (x_sq + r_sq.max())
    best = sq.amax(dim=1) if negated else sq.amin(dim=1)
    candidates = ((best > -row_bound) if negated else (best < row_bound)).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return candidates, candidates
    block = sq if candidates.numel() == sq.shape[0] else sq[candidates]
    bound = row_bound[candidates, None]
    local_rows, cols = ((block > -bound) if negated else (block < bound)).nonzero(as_tuple=True)
    rows = candidates[local_rows]
    found = block[local_rows, cols]
    keep = (-found if negated else found) < NEAR_FRACTION * (x_sq[rows] + r_sq[cols])
    return rows[keep], cols[keep]


def exact_sq_distances(x: Tensor, r: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(P,) squared distances ``|x[rows] - r[cols]|^2`` from the difference vectors, in bounded memory.

    Differentiable with respect to ``x`` and ``r``.
    """
    step = max(1, _RESCORE_ELEMENTS // max(1, x.shape[1]))
    parts = [
        (x[rows[i : i + step]] - r[cols[i : i + step]]).square().sum(1) for i in range(0, len(rows), step)
    ]
    return torch.cat(parts) if parts else x.new_empty(0)


def to_user_scores(internal: Tensor, metric: Metric) -> Tensor:
    """Turn internal scores into what the API returns: similarities, or squared distances (>= 0) for L2."""
    return (-internal).clamp_(min=0.0) if metric == "l2" else internal


def mask_excluded(scores: Tensor, exclude: Tensor | None, row_start: int, col_offset: int) -> None:
    """Set ``scores[r, exclude[row_start + r] - col_offset]`` to -inf where that column lies in the block."""
    if exclude is None:
        return
    ex = exclude[row_start : row_start + scores.shape[0]]
    hit = (ex >= col_offset) & (ex < col_offset + scores.shape[1])
    if bool(hit.any()):
        rows = hit.nonzero().squeeze(1)
        scores[rows, ex[rows] - col_offset] = float("-inf")


def prepared_blocks(
    gallery: BlockSource,
    metric: Metric,
    device: torch.device,
    like: Prepared,
    *,
    progress: bool = False,
    desc: str = "search",
) -> Iterator[tuple[int, Prepared]]:
    """Yield ``(col_offset, block)`` over the gallery's blocks, each prepared like the queries ``like``
    (device, dtype, normalisation), in order: a gallery on disk is read exactly once per pass."""
    total = None if gallery.num_rows is None else -(-gallery.num_rows // gallery.block_size)
    for col_offset, block in tqdm(
        gallery.blocks(), total=total, disable=not progress, desc=desc, unit="block"
    ):
        yield col_offset, prepare(block, metric, device, like=like)
