"""A batch of embeddings as pair-based losses and miners see it.

:class:`PairBatch` holds the validated, normalised embeddings and labels of one batch and computes the
similarity matrix, distances and label masks on first use, so a loss and its miner share them. Mined pairs
are dense (N, M) boolean masks over (anchor, reference), cheaper to build and to consume than index tuples;
mined triplets stay index vectors, since a dense triplet mask would be O(B^3). Both convert to and from
pytorch-metric-learning's index tuples, so miners and losses from either library can be mixed; mined
triplets also serve pair losses as their a-p and a-n pairs. "Same class" is label equality or a
user-supplied ``label_comparison`` (e.g. hierarchical labels), in one place: :attr:`PairBatch.same_label`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from objretrieval._validation import check_embeddings, check_index_range, check_labels
from objretrieval.precision import compute_dtype, upcast
from objretrieval.search.scoring import exact_sq_distances, near_pairs


class MinedPairs(NamedTuple):
    """Pairs selected by a miner as boolean masks over (anchor, reference).

    Attributes:
        positive: (N, M) bool, True for selected same-label pairs.
        negative: (N, M) bool, True for selected different-label pairs.
    """

    positive: Tensor
    negative: Tensor

    def to_indices(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """pytorch-metric-learning's ``(anchor1, positive, anchor2, negative)`` index tuple."""
        a1, p = self.positive.nonzero(as_tuple=True)
        a2, n = self.negative.nonzero(as_tuple=True)
        return a1, p, a2, n


class MinedTriplets(NamedTuple):
    """Triplets selected by a miner; unpacks as pytorch-metric-learning's ``(anchor, positive, negative)``.

    Attributes:
        anchor: (T,) int64 anchor rows.
        positive: (T,) int64 reference rows sharing the anchor's label.
        negative: (T,) int64 reference rows with another label.
    """

    anchor: Tensor
    positive: Tensor
    negative: Tensor


Mined = MinedPairs | MinedTriplets

#: ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix, e.g. for hierarchical labels.
LabelComparison = Callable[[Tensor, Tensor], Tensor]

#: Per-pair multiplicities (positive, negative) of mined pairs that were given more than once.
PairCounts = tuple[Tensor, Tensor]


def _check_indices(t: Tensor, name: str, upper: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(f"mined {name} indices must lie in [0, {upper})")


def pairs_from_indices(
    a1: Tensor, p: Tensor, a2: Tensor, n: Tensor, shape: tuple[int, int]
) -> tuple[MinedPairs, PairCounts | None]:
    """Pair masks of index pairs ``(a1, p)`` and ``(a2, n)``, with the multiplicities when a pair repeats.

    Triplets become pairs as pytorch-metric-learning's ``convert_to_pairs`` makes them: ``(a, p, a, n)``. A
    pair-based loss (``ContrastiveLoss``) weights a repeated pair by its multiplicity, as PML's pair losses do;
    the masks alone describe each distinct pair once.
    """
    masks, counts, repeated = [], [], False
    for rows, cols in ((a1, p), (a2, n)):
        mask = torch.zeros(shape, dtype=torch.bool, device=rows.device)
        mask[rows, cols] = True
        masks.append(mask)
        repeated = repeated or rows.numel() > int(mask.count_nonzero())
    if repeated:
        for rows, cols in ((a1, p), (a2, n)):
            flat = torch.bincount(rows * shape[1] + cols, minlength=shape[0] * shape[1])
            counts.append(flat.view(shape))
    return MinedPairs(*masks), (counts[0], counts[1]) if repeated else None


def as_mined(
    indices_tuple: Any, num_rows: int, num_ref: int, device: torch.device
) -> tuple[Mined | None, PairCounts | None]:
    """Normalise a loss's ``indices_tuple``: ours, PML's 4-tuple of pairs or 3-tuple of triplets.

    Returns the mined structure and, for a 4-tuple that repeats a pair, the pairs' multiplicities.
    """
    counts = None
    if indices_tuple is None or isinstance(indices_tuple, (MinedPairs, MinedTriplets)):
        mined = indices_tuple
    elif isinstance(indices_tuple, (tuple, list)) and len(indices_tuple) in (3, 4):
        parts = tuple(torch.as_tensor(t, device=device).long() for t in indices_tuple)
        if any(t.ndim != 1 for t in parts):
            raise ValueError("mined index tensors must be 1-D")
        if len(parts) == 4:
            a1, p, a2, n = parts
            if a1.shape != p.shape or a2.shape != n.shape:
                raise ValueError("mined pair index tensors (a1, p) and (a2, n) must be of equal length")
            for name, t, upper in zip(
                ("anchor1", "positive", "anchor2", "negative"), parts, (num_rows, num_ref) * 2, strict=True
            ):
                _check_indices(t, name, upper)
            mined, counts = pairs_from_indices(a1, p, a2, n, (num_rows, num_ref))
        else:
            mined = MinedTriplets(*parts)
    else:
        raise TypeError(
            "indices_tuple must be None, MinedPairs, MinedTriplets, (anchor1, positive, anchor2, negative) or "
            f"(anchor, positive, negative) index tensors; got {type(indices_tuple).__name__}"
        )
    if isinstance(mined, MinedPairs) and (
        mined.positive.shape != (num_rows, num_ref) or mined.negative.shape != (num_rows, num_ref)
    ):
        raise ValueError(
            f"mined pair masks must have shape ({num_rows}, {num_ref}), got {tuple(mined.positive.shape)} "
            f"and {tuple(mined.negative.shape)}"
        )
    if isinstance(mined, MinedPairs):
        if mined.positive.dtype != torch.bool or mined.negative.dtype != torch.bool:
            raise TypeError(  # a cast would turn a weight of 0.5 into a selected pair
                f"mined pair masks must be bool, got {mined.positive.dtype} and {mined.negative.dtype}"
            )
        mined = MinedPairs(*(m.to(device) for m in mined))
    if isinstance(mined, MinedTriplets):
        a, p, n = (t.to(device).long() for t in mined)
        if not a.shape == p.shape == n.shape or a.ndim != 1:
            raise ValueError("triplet index tensors must be 1-D and of equal length")
        for name, t, upper in (("anchor", a, num_rows), ("positive", p, num_ref), ("negative", n, num_ref)):
            _check_indices(t, f"triplet {name}", upper)
        mined = MinedTriplets(a, p, n)
    return mined, counts


def _plus_transpose(g: Tensor, panel: int = 128) -> Tensor:
    """``g + g.T`` for a square matrix; on the CPU in column panels, three times faster than the strided add."""
    if g.device.type != "cpu" or g.shape[0] < 4 * panel:
        return g + g.T
    out = torch.empty_like(g)
    for j in range(0, g.shape[1], panel):
        torch.add(g[:, j : j + panel], g[j : j + panel, :].T, out=out[:, j : j + panel])
    return out


class _SelfSimilarity(torch.autograd.Function):
    """``x @ x.T`` whose backward is the single product ``(G + G^T) x`` (autograd would do two)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _plus_transpose(grad) @ x


class _GramDistance(torch.autograd.Function):
    """Euclidean distances ``sqrt(max(|x|^2 + |r|^2 - 2 S, floor) + offset)`` from inner products S, fused:
    one (N, M) buffer in the forward pass and one in the backward, instead of a chain of temporaries.

    Also returns the ``(rows, cols)`` of the nearly coincident pairs, where the formula cancels and loses
    precision (:func:`~objretrieval.search.scoring.near_pairs`), found on the squared distances it forms anyway.
    With ``self_pairs`` (the references are the rows themselves) the diagonal is set to its exact value, 0
    apart with no gradient, instead of being found "near" and recomputed on every call.
    """

    @staticmethod
    def forward(
        ctx: Any, s: Tensor, x_sq: Tensor, r_sq: Tensor, floor: float, offset: float, self_pairs: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        d = (x_sq[:, None] + r_sq[None, :]).sub_(s, alpha=2.0)
        if self_pairs:
            d.diagonal().fill_(float("inf"))  # never near: known exactly
        rows, cols = near_pairs(d, x_sq, r_sq)
        if self_pairs:
            d.diagonal().fill_(0.0)
        kept = d >= floor  # where the clamp passes gradient
        if self_pairs:
            kept.diagonal().fill_(False)  # |x_i - x_i| is constant
        d.clamp_(min=floor).add_(offset).sqrt_()
        ctx.save_for_backward(d, kept)
        ctx.mark_non_differentiable(rows, cols)
        return d, rows, cols

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
        d, kept = ctx.saved_tensors
        half = torch.where(kept, grad / (2.0 * d), 0.0)  # d d / d sq
        return -2.0 * half, half.sum(1), half.sum(0), None, None, None


def self_similarity(x: Tensor) -> Tensor:
    """(N, N) Gram matrix ``x x^T`` of (N, D) ``x``, with a one-product backward."""
    return _SelfSimilarity.apply(x)


@dataclass
class PairBatch:
    """One batch as losses see it; similarity and label masks are computed on first use.

    Attributes:
        embeddings: (N, D) in the compute dtype, L2-normalised if the loss normalises.
        labels: (N,) int64.
        ref: (M, D) references, the embeddings themselves unless ``ref_emb`` was given.
        ref_labels: (M,) int64.
        ref_is_self: whether ``ref`` is ``embeddings`` (then the diagonal pairs an item with itself).
        ref_self_index: (N,) int64 column of ``ref`` holding each row itself (-1: none), when the references
            contain the batch (a gathered global batch, a cross-batch memory); those pairs are self-pairs.
        mined: pairs or triplets chosen by a miner, if any.
        mined_counts: multiplicities of mined pairs given more than once (PML index tuples), else None.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` replacing label equality.
    """

    embeddings: Tensor
    labels: Tensor
    ref: Tensor
    ref_labels: Tensor
    ref_is_self: bool
    mined: Mined | None = None
    mined_counts: PairCounts | None = None
    label_comparison: LabelComparison | None = None
    ref_self_index: Tensor | None = None

    @cached_property
    def similarity(self) -> Tensor:
        """(N, M) inner products (cosine similarities when normalised)."""
        if self.ref_is_self:
            return self_similarity(self.embeddings)
        return self.embeddings @ self.ref.T

    @cached_property
    def same_label(self) -> Tensor:
        """(N, M) bool "same class", the diagonal included: label equality or ``label_comparison``."""
        if self.label_comparison is None:
            return self.labels[:, None] == self.ref_labels[None, :]
        same = self.label_comparison(self.labels, self.ref_labels)
        shape = (self.labels.shape[0], self.ref_labels.shape[0])
        if not isinstance(same, Tensor) or same.dtype != torch.bool or tuple(same.shape) != shape:
            got = f"{same.dtype} {tuple(same.shape)}" if isinstance(same, Tensor) else type(same).__name__
            raise TypeError(f"label_comparison must return a bool tensor of shape {shape}, got {got}")
        return same.to(self.labels.device)

    @cached_property
    def is_self(self) -> Tensor:
        """(N, M) bool, True where a reference is the anchor itself."""
        n, m = self.labels.shape[0], self.ref_labels.shape[0]
        if self.ref_is_self:
            return torch.eye(n, m, dtype=torch.bool, device=self.labels.device)
        if self.ref_self_index is not None:
            columns = torch.arange(m, device=self.labels.device)
            return columns[None, :] == self.ref_self_index[:, None]
        return torch.zeros(n, m, dtype=torch.bool, device=self.labels.device)

    @cached_property
    def _mined_pairs(self) -> tuple[MinedPairs | None, PairCounts | None]:
        if isinstance(self.mined, MinedTriplets):
            a, p, n = self.mined
            return pairs_from_indices(a, p, a, n, (self.labels.shape[0], self.ref_labels.shape[0]))
        return self.mined, self.mined_counts

    @property
    def mined_pairs(self) -> MinedPairs | None:
        """The mining as pair masks: mined pairs, or the a-p and a-n pairs of mined triplets; None if none."""
        return self._mined_pairs[0]

    @property
    def pair_counts(self) -> PairCounts | None:
        """(N, M) int64 multiplicities of the mined (positive, negative) pairs when some pair repeats, else None."""
        return self._mined_pairs[1]

    @cached_property
    def positive_mask(self) -> Tensor:
        """(N, M) bool same-label pairs without self-pairs, restricted to mined pairs if any."""
        mask = self.same_label & ~self.is_self
        return mask if self.mined_pairs is None else mask & self.mined_pairs.positive

    @cached_property
    def negative_mask(self) -> Tensor:
        """(N, M) bool different-label pairs, restricted to mined pairs if any."""
        mask = ~self.same_label
        return mask if self.mined_pairs is None else mask & self.mined_pairs.negative

    def distances(self, floor: float = 1e-12, offset: float = 0.0) -> Tensor:
        """(N, M) Euclidean distances ``sqrt(max(squared, floor) + offset)`` (the floor keeps gradients finite).

        They come from the Gram matrix :attr:`similarity`, except for nearly coincident pairs, where that
        formula cancels: those few are recomputed from their difference vectors and spliced in, with their
        own gradients, so values and gradients keep the precision of the dtype at any distance.
        """
        x_sq = self.embeddings.pow(2).sum(1)
        r_sq = x_sq if self.ref_is_self else self.ref.pow(2).sum(1)
        d, rows, cols = _GramDistance.apply(self.similarity, x_sq, r_sq, floor, offset, self.ref_is_self)
        if rows.numel() == 0:
            return d
        exact = exact_sq_distances(self.embeddings, self.ref, rows, cols).clamp(min=floor).add(offset).sqrt()
        return d.index_put((rows, cols), exact)  # out of place: the fast path's backward keeps its buffer

    def triplets(self) -> MinedTriplets | None:
        """The mined triplets, if the mining was triplets."""
        return self.mined if isinstance(self.mined, MinedTriplets) else None


def make_pair_batch(
    embeddings: Tensor,
    labels: Any,
    indices_tuple: Any = None,
    ref_emb: Tensor | None = None,
    ref_labels: Any = None,
    *,
    normalize: bool = True,
    label_comparison: LabelComparison | None = None,
    ref_self_index: Any = None,
) -> PairBatch:
    """Validate the inputs of a loss or miner call and build its :class:`PairBatch`.

    Embeddings (and references) are checked (2-D, floating, finite), upcast to the compute dtype of
    :mod:`objretrieval.precision` (float32, float64 stays) and L2-normalised if ``normalize``; labels must be
    integers, one per row, and move to the embeddings' device. ``ref_self_index`` (with ``ref_emb`` only)
    gives each row's own column in ``ref_emb``, or -1.
    """
    x = check_embeddings(embeddings, "embeddings")
    y = check_labels(labels, "labels", x.shape[0], "embeddings").to(x.device)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    r_in = None if ref_emb is None else check_embeddings(ref_emb, "ref_emb")
    dtype = compute_dtype(x, r_in)
    f = upcast(x, dtype)
    f = F.normalize(f, dim=1) if normalize else f
    if r_in is None:
        r, ry = f, y
    else:
        r = upcast(r_in.to(x.device), dtype)
        if r.shape[1] != x.shape[1]:
            raise ValueError(f"ref_emb has dim {r.shape[1]} but embeddings have dim {x.shape[1]}")
        r = F.normalize(r, dim=1) if normalize else r
        ry = check_labels(ref_labels, "ref_labels", r.shape[0], "ref_emb").to(x.device)
    self_index = None
    if ref_self_index is not None:
        if r_in is None:
            raise ValueError(
                "ref_self_index needs ref_emb: without references the batch is its own reference"
            )
        self_index = check_index_range(
            check_labels(ref_self_index, "ref_self_index", x.shape[0], "embeddings"),
            "ref_self_index",
            low=-1,
            high=r.shape[0],
        ).to(x.device)
    mined, counts = as_mined(indices_tuple, f.shape[0], r.shape[0], x.device)
    return PairBatch(f, y, r, ry, r_in is None, mined, counts, label_comparison, self_index)
