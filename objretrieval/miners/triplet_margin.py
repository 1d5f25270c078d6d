"""Triplets selected by how much they violate the margin: pytorch-metric-learning's ``TripletMarginMiner``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison, MinedTriplets, PairBatch
from objretrieval.miners.base import Miner

TripletType = Literal["all", "hard", "semihard", "easy"]
TripletDistance = Literal["euclidean", "cosine"]

_CHUNK_ELEMENTS = 1 << 24  # elements of one (anchor chunk, M, M) comparison


class TripletMarginMiner(Miner):
    """Every (anchor, positive, negative) whose margin ``t = d(a, n) - d(a, p)`` passes the selection.

    - ``"all"``: t <= margin (the triplets with a non-negative triplet loss);
    - ``"hard"``: t <= margin and t <= 0 (the negative is at least as close as the positive);
    - ``"semihard"``: 0 < t <= margin;
    - ``"easy"``: t > margin (the triplets the triplet loss ignores, for another loss).

    d is the Euclidean distance of normalised embeddings, or ``distance="cosine"``: d = -cos. This is PML's
    miner with ``LpDistance()`` / ``CosineSimilarity()``, triplets in the same (anchor, positive, negative)
    lexicographic order. The triplets are materialised, O(number of triplets) memory; to train a
    ``TripletMarginLoss`` on all / hard / semihard triplets, its ``selection`` does the same without them.

    Args:
        margin: the margin.
        selection: ``"all"``, ``"hard"``, ``"semihard"`` or ``"easy"``.
        distance: ``"euclidean"`` or ``"cosine"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
    """

    def __init__(
        self,
        margin: float = 0.2,
        selection: TripletType = "all",
        *,
        distance: TripletDistance = "euclidean",
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.margin = check_number(margin, "margin")
        self.selection: TripletType = check_choice(selection, "selection", TripletType)
        self.distance: TripletDistance = check_choice(distance, "distance", TripletDistance)

    def keep(self, t: Tensor) -> Tensor:
        """Which triplet margins ``t = d_an - d_ap`` the selection keeps."""
        if self.selection == "easy":
            return t > self.margin
        kept = t <= self.margin
        if self.selection == "hard":
            kept &= t <= 0
        elif self.selection == "semihard":
            kept &= t > 0
        return kept

    def mine(self, batch: PairBatch) -> MinedTriplets:
        d = -batch.similarity if self.distance == "cosine" else batch.distances()
        pos, neg = batch.positive_mask, batch.negative_mask
        m = d.shape[1]
        chunk = max(1, _CHUNK_ELEMENTS // (m * m))
        found = []
        for start in range(0, d.shape[0], chunk):
            rows = slice(start, start + chunk)
            t = d[rows, None, :] - d[rows, :, None]  # [a, p, n] = d_an - d_ap
            valid = pos[rows, :, None] & neg[rows, None, :] & self.keep(t)
            a, p, n = valid.nonzero(as_tuple=True)
            found.append((a + start, p, n))
        a, p, n = (torch.cat(parts) for parts in zip(*found, strict=True))
        return MinedTriplets(a, p, n)
