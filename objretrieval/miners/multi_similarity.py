"""The multi-similarity miner (Wang et al., CVPR 2019), as dense pair masks."""

from __future__ import annotations

import torch

from objretrieval.batch import MinedPairs, PairBatch
from objretrieval.miners.base import Miner


class MultiSimilarityMiner(Miner):
    """Keep the informative pairs of each anchor, judged against its hardest pair of the other kind.

    A positive pair is kept if ``S_ap - epsilon < max_n S_an``; a negative pair if ``S_an + epsilon >
    min_p S_ap`` (cosine similarities; self-pairs excluded). Anchors without negatives keep no positives and
    vice versa. Matches pytorch-metric-learning's ``MultiSimilarityMiner``; returns dense
    :class:`~objretrieval.miners.MinedPairs`.

    Args:
        epsilon: similarity margin.
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        self.epsilon = float(epsilon)

    def mine(self, batch: PairBatch) -> MinedPairs:
        s, positive, negative = batch.similarity, batch.positive_mask, batch.negative_mask
        hardest_negative = torch.where(negative, s, float("-inf")).amax(dim=1, keepdim=True)
        hardest_positive = torch.where(positive, s, float("inf")).amin(dim=1, keepdim=True)
        return MinedPairs(
            positive & (s - self.epsilon < hardest_negative), negative & (s + self.epsilon > hardest_positive)
        )
