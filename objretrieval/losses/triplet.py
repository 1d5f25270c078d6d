"""Triplet margin loss over given triplets or over every valid triplet of a batch in O(B^2) memory."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison
from objretrieval.losses.base import MetricLoss, PairBatch, Reduction, reduction_divisor

Selection = Literal["all", "hard", "semihard"]
#: ``"euclidean"``: d = ||a - b|| of normalised embeddings; ``"cosine"``: d = -cos(a, b), so the loss is
#: ``relu(s_an - s_ap + margin)`` (PML's ``distance=CosineSimilarity()``).
TripletDistance = Literal["euclidean", "cosine"]

_COMPACT_MAX_POSITIVES = 32  # up to this many positives per anchor, compare directly instead of sorting


class TripletMarginLoss(MetricLoss):
    """``relu(d(a, p) - d(a, n) + margin)`` averaged over the triplets with a positive loss.

    Distances are Euclidean between L2-normalised embeddings, or ``distance="cosine"``: d = -cos, the loss
    ``relu(s_an - s_ap + margin)``. With mined triplets (``indices_tuple``), those are used; mined pairs
    give the triplets of an anchor's mined positive and negative pairs (as PML's ``convert_to_triplets``).
    Otherwise every valid triplet of the batch is considered, optionally restricted to those with a positive
    loss that also satisfy:

    - ``"all"``: nothing more (every (anchor, positive, negative));
    - ``"hard"``: d(a, n) <= d(a, p);
    - ``"semihard"``: d(a, p) < d(a, n) (below d(a, p) + margin, as a positive loss requires).

    These are pytorch-metric-learning's ``TripletMarginMiner`` types followed by its ``TripletMarginLoss``
    (they differ only on exact ties, where PML keeps a triplet of zero loss), computed without
    materialising triplets: for each (anchor, positive) the
    active negatives are a contiguous range of the anchor's sorted negative distances, so counts and sums come
    by direct comparison in chunks (few positives per anchor: O(B^2 P)) or from sorted rows and binary
    searches (O(B^2 log B)), in O(B^2) memory instead of O(B^3).

    Args:
        margin: the triplet margin (a negative one asks for d(a, n) < d(a, p) - |margin| only).
        selection: which triplets to use when none are given.
        distance: ``"euclidean"`` or ``"cosine"``.
        reduction: ``"mean_nonzero"`` (over the triplets with a positive loss, PML's default),
            ``"mean"`` (over every considered triplet, PML's ``MeanReducer``; with ``"hard"`` and
            ``"semihard"`` every selected triplet has a positive loss, so the two agree) or ``"sum"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.

    The defaults are PML's, which train from a random start. Preset
    (:meth:`~objretrieval.losses.MetricLoss.from_preset`): ``"liao2023"``, the "Triplet" baseline of Liao et
    al. (ICML 2023): margin 0.05 on triplets from ``DistanceWeightedMiner(cutoff=0.5,
    nonzero_loss_cutoff=1.4)``, which the caller passes (``shared/specs/contextual.md`` section 2).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {"liao2023": {"margin": 0.05}}

    def __init__(
        self,
        margin: float = 0.05,
        selection: Selection = "all",
        *,
        distance: TripletDistance = "euclidean",
        reduction: Reduction = "mean_nonzero",
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.margin = check_number(margin, "margin")
        if selection == "easy":
            raise ValueError(
                "selection='easy' keeps only triplets with d(a, n) > d(a, p) + margin, whose triplet loss is 0; "
                "mine them with objretrieval.miners.TripletMarginMiner(selection='easy') for another loss"
            )
        self.selection: Selection = check_choice(selection, "selection", Selection)
        self.distance: TripletDistance = check_choice(distance, "distance", TripletDistance)
        self.reduction: Reduction = check_choice(reduction, "reduction", Reduction)

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        triplets = batch.triplets()
        if triplets is not None:
            return self._given(batch, *triplets)
        return self._all(batch)

    def _given(self, batch: PairBatch, a: Tensor, p: Tensor, n: Tensor) -> Tensor | None:
        if a.numel() == 0:
            return None
        x, ref = batch.embeddings, batch.ref
        if self.distance == "cosine":
            d_ap, d_an = -(x[a] * ref[p]).sum(1), -(x[a] * ref[n]).sum(1)
        else:
            d_ap = (x[a] - ref[p]).pow(2).sum(1).clamp(min=1e-12).sqrt()
            d_an = (x[a] - ref[n]).pow(2).sum(1).clamp(min=1e-12).sqrt()
        losses = (d_ap - d_an + self.margin).clamp(min=0)
        return losses.sum() / reduction_divisor(self.reduction, (losses > 0).sum(), a.numel())

    def _all(self, batch: PairBatch) -> Tensor | None:
        """Every selected triplet, as sum_{a,p} c_ap (d_ap + m) - sum_{a,n} c_an d_an.

        c_ap counts the active negatives of (a, p) and c_an the positives that n is active with. Both counts
        come from one set of float comparisons, so they agree exactly and the expression equals the sum of the
        triplets' losses, with the right gradient for d_ap and d_an (the counts are locally constant). A
        triplet is active when its loss is positive, d_an < d_ap + m, and it passes the selection.
        """
        pos, neg = batch.positive_mask, batch.negative_mask
        num_pos = pos.sum(1)
        if not bool(((num_pos > 0) & neg.any(1)).any()):
            return None
        if self.selection == "semihard" and self.margin <= 0:
            return None  # d_ap < d_an < d_ap + m is impossible
        # with m <= 0 a positive loss implies d_an < d_ap, so "hard" adds nothing to the loss condition
        hard = self.selection == "hard" and self.margin > 0
        d = -batch.similarity if self.distance == "cosine" else batch.distances()
        width = int(num_pos.max())
        with torch.no_grad():
            if width <= _COMPACT_MAX_POSITIVES:
                slots, count_slot, count_an = self._count_compact(d, pos, neg, width, hard)
            else:
                slots, count_slot, count_an = self._count_sorted(d, pos, neg, num_pos, hard)
            active = count_slot.sum()
            # total = sum_{a,j} W_aj d_aj + m * active with W = c_ap at positives minus c_an at negatives
            weights = count_an.to(d.dtype).neg_().scatter_add_(1, slots, count_slot.to(d.dtype))
            # "mean" over every triplet considered: all of them, or the selected ones (all active)
            considered = (num_pos * neg.sum(1)).sum() if self.selection == "all" else active
        total = torch.dot(weights.flatten(), d.flatten()) + self.margin * active.to(d.dtype)  # not float32
        return total / reduction_divisor(self.reduction, active, considered)

    def _count_compact(
        self, d: Tensor, pos: Tensor, neg: Tensor, width: int, hard: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Counts by direct comparison, one positive slot at a time: O(B^2 P) time, O(B^2) memory."""
        slots, valid = _positive_slots(pos, width)
        d_ap = d.gather(1, slots)
        count_slot = torch.zeros_like(slots, dtype=torch.int32)
        count_an = torch.zeros_like(d)
        for p in range(width):
            dp = d_ap[:, p : p + 1]
            if hard:
                active = d <= dp
            else:
                active = d < dp + self.margin
                if self.selection == "semihard":
                    active &= d > dp
            active &= neg & valid[:, p : p + 1]
            count_slot[:, p] = active.view(torch.uint8).sum(1, dtype=torch.int32)  # far faster than bool sum
            count_an.add_(active)
        return slots, count_slot, count_an

    def _count_sorted(
        self, d: Tensor, pos: Tensor, neg: Tensor, num_pos: Tensor, hard: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Counts by binary search in each anchor's sorted distances: O(B^2 log B) for any class size."""
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        dp = torch.where(pos, d, inf)
        hi = dp + self.margin
        dn_sorted = torch.where(neg, d, inf).sort(dim=1).values.contiguous()
        dn = torch.where(neg, d, -inf).contiguous()
        dp_sorted = dp.sort(dim=1).values.contiguous()
        dp_below_dn = torch.searchsorted(dp_sorted, dn)  # #{p: d_ap < d_an}
        if hard:  # d_an <= d_ap
            count_ap = torch.searchsorted(dn_sorted, dp.contiguous(), right=True)
            count_an = num_pos[:, None] - dp_below_dn
        else:  # d_an < d_ap + m, and for semihard also d_an > d_ap
            # fl(x + m) is monotone in x, so the sorted upper bounds are the sorted distances plus m
            hi_below_dn = torch.searchsorted((dp_sorted + self.margin).contiguous(), dn, right=True)
            count_ap = torch.searchsorted(dn_sorted, hi.contiguous())
            count_an = num_pos[:, None] - hi_below_dn
            if self.selection == "semihard":
                count_ap = count_ap - torch.searchsorted(dn_sorted, dp.contiguous(), right=True)
                count_an = dp_below_dn - hi_below_dn
        slots = torch.arange(d.shape[1], device=d.device).expand_as(d)
        return slots, torch.where(pos, count_ap.clamp(min=0), 0), torch.where(neg, count_an.clamp(min=0), 0)


def _positive_slots(pos: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(B, width) reference indices of each anchor's positives, left-aligned, and which slots are real."""
    rows, cols = pos.nonzero(as_tuple=True)
    per_row = pos.sum(1)
    place = torch.arange(rows.numel(), device=pos.device) - (per_row.cumsum(0) - per_row)[rows]
    slots = torch.zeros(pos.shape[0], width, dtype=torch.int64, device=pos.device)
    valid = torch.zeros(pos.shape[0], width, dtype=torch.bool, device=pos.device)
    slots[rows, place] = cols
    valid[rows, place] = True
    return slots, valid
