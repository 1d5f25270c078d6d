"""The multi-similarity miner (Wang et al., CVPR 2019), as dense pair masks."""

from __future__ import annotations

from typing import Literal

import torch

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison, MinedPairs, PairBatch
from objretrieval.miners.base import Miner

#: ``"cosine"``: cosine similarity (PML's default); ``"euclidean"``: L2 distance of normalised embeddings
#: (PML's ``distance=LpDistance()``).
MinerDistance = Literal["cosine", "euclidean"]


class MultiSimilarityMiner(Miner):
    """Keep the informative pairs of each anchor, judged against its hardest pair of the other kind.

    On cosine similarities a positive pair is kept if ``S_ap - epsilon < max_n S_an`` and a negative pair
    if ``S_an + epsilon > min_p S_ap``; on Euclidean distances if ``d_ap + epsilon > min_n d_an`` and
    ``d_an - epsilon < max_p d_ap`` (self-pairs excluded). Anchors without negatives keep no positives and
    vice versa. Matches pytorch-metric-learning's ``MultiSimilarityMiner`` (with ``CosineSimilarity()`` or
    ``LpDistance()``); returns dense :class:`~objretrieval.miners.MinedPairs`.

    Args:
        epsilon: similarity (or distance) margin, >= 0.
        distance: ``"cosine"`` or ``"euclidean"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        *,
        distance: MinerDistance = "cosine",
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.epsilon = check_number(epsilon, "epsilon", low=0.0)
        self.distance: MinerDistance = check_choice(distance, "distance", MinerDistance)

    def mine(self, batch: PairBatch) -> MinedPairs:
        positive, negative = batch.positive_mask, batch.negative_mask
        # a similarity, larger is closer: Euclidean distances enter negated, so one rule serves both
        s = batch.similarity if self.distance == "cosine" else -batch.distances()
        hardest_negative = torch.where(negative, s, float("-inf")).amax(dim=1, keepdim=True)
        hardest_positive = torch.where(positive, s, float("inf")).amin(dim=1, keepdim=True)
        return MinedPairs(
            positive & (s - self.epsilon < hardest_negative), negative & (s + self.epsilon > hardest_positive)
        )
