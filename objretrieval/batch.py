"""A batch of embeddings as pair-based losses and miners see it.

:class:`PairBatch` holds the validated, normalised embeddings and labels of one batch and computes the
similarity matrix, distances and label masks on first use, so a loss and its miner share them. Mined pairs
are dense (N, M) boolean masks over (anchor, reference), cheaper to build and to consume than index tuples;
mined triplets stay index vectors, since a dense triplet mask would be O(B^3). Both convert to and from
pytorch-metric-learning's index tuples, so miners and losses from either library can be mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from objretrieval._validation import check_embeddings, check_labels


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


def as_mined(indices_tuple: Any, num_rows: int, num_ref: int, device: torch.device) -> Mined | None:
    """Normalise a loss's ``indices_tuple`` argument: ours, PML's 4-tuple of pairs or 3-tuple of triplets."""
    if indices_tuple is None or isinstance(indices_tuple, (MinedPairs, MinedTriplets)):
        mined = indices_tuple
    elif isinstance(indices_tuple, (tuple, list)) and len(indices_tuple) == 4:
        a1, p, a2, n = (torch.as_tensor(t, device=device).long() for t in indices_tuple)
        pos = torch.zeros(num_rows, num_ref, dtype=torch.bool, device=device)
        neg = torch.zeros_like(pos)
        pos[a1, p] = True
        neg[a2, n] = True
        mined = MinedPairs(pos, neg)
    elif isinstance(indices_tuple, (tuple, list)) and len(indices_tuple) == 3:
        mined = MinedTriplets(*(torch.as_tensor(t, device=device).long() for t in indices_tuple))
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
    if isinstance(mined, MinedTriplets):
        a, p, n = mined
        if not a.shape == p.shape == n.shape or a.ndim != 1:
            raise ValueError("triplet index tensors must be 1-D and of equal length")
        for name, t, upper in (("anchor", a, num_rows), ("positive", p, num_ref), ("negative", n, num_ref)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
                raise ValueError(f"triplet {name} indices must lie in [0, {upper})")
        mined = MinedTriplets(a.to(device), p.to(device), n.to(device))
    return mined


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
    one (N, M) buffer in the forward pass and one in the backward, instead of a chain of temporaries."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, x_sq: Tensor, r_sq: Tensor, floor: float, offset: float) -> Tensor:
        d = (x_sq[:, None] + r_sq[None, :]).sub_(s, alpha=2.0)
        kept = d >= floor  # where the clamp passes gradient
        d.clamp_(min=floor).add_(offset).sqrt_()
        ctx.save_for_backward(d, kept)
        return d

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        d, kept = ctx.saved_tensors
        half = torch.where(kept, grad / (2.0 * d), 0.0)  # d d / d sq
        return -2.0 * half, half.sum(1), half.sum(0), None, None


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
        mined: pairs or triplets chosen by a miner, if any.
    """

    embeddings: Tensor
    labels: Tensor
    ref: Tensor
    ref_labels: Tensor
    ref_is_self: bool
    mined: Mined | None = None

    @cached_property
    def similarity(self) -> Tensor:
        """(N, M) inner products (cosine similarities when normalised)."""
        if self.ref_is_self:
            return self_similarity(self.embeddings)
        return self.embeddings @ self.ref.T

    @cached_property
    def same_label(self) -> Tensor:
        """(N, M) bool label equality, the diagonal included."""
        return self.labels[:, None] == self.ref_labels[None, :]

    @cached_property
    def is_self(self) -> Tensor:
        """(N, M) bool, True where a reference is the anchor itself."""
        n, m = self.same_label.shape
        if not self.ref_is_self:
            return torch.zeros(n, m, dtype=torch.bool, device=self.labels.device)
        return torch.eye(n, m, dtype=torch.bool, device=self.labels.device)

    @cached_property
    def positive_mask(self) -> Tensor:
        """(N, M) bool same-label pairs without self-pairs, restricted to mined pairs if any."""
        mask = self.same_label & ~self.is_self
        return mask & self.mined.positive if isinstance(self.mined, MinedPairs) else mask

    @cached_property
    def negative_mask(self) -> Tensor:
        """(N, M) bool different-label pairs, restricted to mined pairs if any."""
        mask = ~self.same_label
        return mask & self.mined.negative if isinstance(self.mined, MinedPairs) else mask

    def distances(self, floor: float = 1e-12, offset: float = 0.0) -> Tensor:
        """(N, M) Euclidean distances ``sqrt(max(squared, floor) + offset)`` (the floor keeps gradients finite)."""
        x_sq = self.embeddings.pow(2).sum(1)
        r_sq = x_sq if self.ref_is_self else self.ref.pow(2).sum(1)
        return _GramDistance.apply(self.similarity, x_sq, r_sq, floor, offset)

    def triplets(self) -> MinedTriplets | None:
        return self.mined if isinstance(self.mined, MinedTriplets) else None


def make_pair_batch(
    embeddings: Tensor,
    labels: Any,
    indices_tuple: Any = None,
    ref_emb: Tensor | None = None,
    ref_labels: Any = None,
    *,
    normalize: bool = True,
) -> PairBatch:
    """Validate the inputs of a loss or miner call and build its :class:`PairBatch`.

    Embeddings (and references) are checked (2-D, floating, finite), cast to float32 (float64 stays) and
    L2-normalised if ``normalize``; labels must be integers, one per row, and move to the embeddings' device.
    """
    x = check_embeddings(embeddings, "embeddings")
    y = check_labels(labels, "labels", x.shape[0], "embeddings").to(x.device)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together")
    dtype = torch.promote_types(x.dtype, torch.float32)
    f = x.to(dtype)
    f = F.normalize(f, dim=1) if normalize else f
    if ref_emb is None:
        r, ry = f, y
    else:
        r = check_embeddings(ref_emb, "ref_emb").to(device=x.device, dtype=dtype)
        if r.shape[1] != x.shape[1]:
            raise ValueError(f"ref_emb has dim {r.shape[1]} but embeddings have dim {x.shape[1]}")
        r = F.normalize(r, dim=1) if normalize else r
        ry = check_labels(ref_labels, "ref_labels", r.shape[0], "ref_emb").to(x.device)
    mined = as_mined(indices_tuple, f.shape[0], r.shape[0], x.device)
    return PairBatch(f, y, r, ry, ref_emb is None, mined)
