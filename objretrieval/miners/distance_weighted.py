"""Distance-weighted sampling (Wu et al., "Sampling Matters", ICCV 2017), vectorised over the batch."""

from __future__ import annotations

import torch
from torch import Tensor

from objretrieval._validation import check_number, check_positive_int
from objretrieval.batch import LabelComparison, MinedTriplets, PairBatch
from objretrieval.miners.base import Miner


class DistanceWeightedMiner(Miner):
    """One triplet per anchor (or ``triplets_per_anchor``): a uniform positive and a distance-weighted negative.

    Negatives are drawn with probability proportional to the inverse density of pairwise distances on the
    unit sphere in D dimensions, q(d)^-1 with log q(d)^-1 = (2 - D) log d - ((D - 3) / 2) log(1 - d^2 / 4),
    d = sqrt(max(||a - n||^2, 1e-4)) clamped below at ``cutoff``; same-label items get probability 0. This is
    MIC's ``distanceweightedsampling``. ``nonzero_loss_cutoff`` (1.4 in the paper and in
    pytorch-metric-learning; MIC drops it) zeroes the weight of negatives at or beyond that distance; an anchor
    whose negatives all fall there draws uniformly among them.

    All anchors are sampled at once (:func:`sample_rows`); pass a ``generator`` for reproducible draws.

    Args:
        cutoff: lower distance cutoff, in [0, 2) (unit vectors are at most 2 apart).
        nonzero_loss_cutoff: optional upper distance cutoff, >= 0 (at or below ``cutoff``: uniform draws).
        triplets_per_anchor: triplets drawn for each anchor (with replacement), >= 1.
        generator: random generator for the draws.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
    """

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float | None = None,
        triplets_per_anchor: int = 1,
        generator: torch.Generator | None = None,
        *,
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.cutoff = check_number(cutoff, "cutoff", low=0.0, high=2.0, high_open=True)
        if nonzero_loss_cutoff is not None:
            nonzero_loss_cutoff = check_number(nonzero_loss_cutoff, "nonzero_loss_cutoff", low=0.0)
        self.nonzero_loss_cutoff = nonzero_loss_cutoff
        self.triplets_per_anchor = check_positive_int(triplets_per_anchor, "triplets_per_anchor")
        self.generator = generator

    def distances(self, embeddings: Tensor, ref: Tensor) -> Tensor:
        """(N, M) ``sqrt(max(||x - y||^2, 1e-4))`` clamped below at ``cutoff``."""
        sq = embeddings.pow(2).sum(1)[:, None] + ref.pow(2).sum(1)[None, :] - 2.0 * embeddings @ ref.T
        return sq.clamp(min=1e-4).sqrt().clamp(min=self.cutoff)

    def negative_probabilities(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref: Tensor,
        ref_labels: Tensor,
        negative: Tensor | None = None,
    ) -> Tensor:
        """(N, M) probability that anchor i draws reference j as its negative (rows of zeros: no negative).

        ``negative`` (N, M) bool, if given, marks the allowed negatives instead of ``labels != ref_labels``.
        """
        d = self.distances(embeddings, ref)
        dim = float(embeddings.shape[1])
        log_w = (2.0 - dim) * d.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * d.pow(2)).clamp(min=1e-8).log()
        allowed = labels[:, None] != ref_labels[None, :] if negative is None else negative
        log_w = log_w.masked_fill(~allowed, float("-inf"))
        # shift each row by its own maximum for stability; rows without negatives stay all zero
        shift = log_w.amax(dim=1, keepdim=True).nan_to_num(neginf=0.0)
        w = (log_w - shift).exp()
        if self.nonzero_loss_cutoff is not None:
            cut = w * (d < self.nonzero_loss_cutoff)
            w = torch.where(cut.sum(1, keepdim=True) > 0, cut, allowed.to(w.dtype))  # all beyond: uniform
        return w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)

    def mine(self, batch: PairBatch) -> MinedTriplets:
        same, labels = batch.positive_mask, batch.labels
        neg_p = self.negative_probabilities(
            batch.embeddings, labels, batch.ref, batch.ref_labels, batch.negative_mask
        )
        anchors = ((same.any(1)) & (neg_p.sum(1) > 0)).nonzero().squeeze(1)
        k = self.triplets_per_anchor
        if anchors.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=labels.device)
            return MinedTriplets(empty, empty, empty)
        positives = sample_rows(same[anchors].to(neg_p.dtype), k, self.generator)
        negatives = sample_rows(neg_p[anchors], k, self.generator)
        return MinedTriplets(anchors.repeat_interleave(k), positives.flatten(), negatives.flatten())


def sample_rows(weights: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """(R, k) column indices drawn with replacement from each row's non-negative ``weights`` (R, M).

    Inverse-CDF sampling: a cumulative sum and a binary search per draw, O(R M + R k log M), where
    ``torch.multinomial`` spends an exponential variate on every entry. Zero-weight columns are never drawn;
    every row needs a positive total.
    """
    cdf = weights.cumsum(dim=1)
    # draw where the generator lives (a CPU generator may drive a CUDA batch), then move to the weights
    device = generator.device if generator is not None else cdf.device
    u = torch.rand(weights.shape[0], k, generator=generator, dtype=cdf.dtype, device=device).to(cdf.device)
    u = u * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u, right=True)  # first column whose cumulative weight exceeds u
    # u * total can round up to the total itself; fall back to the row's last drawable column
    last = weights.shape[1] - 1 - (weights > 0).flip(1).to(torch.int8).argmax(dim=1, keepdim=True)
    return torch.minimum(drawn, last)
