"""Multi-similarity loss (Wang et al., CVPR 2019)."""

from __future__ import annotations

from torch import Tensor

from objretrieval.losses.base import MetricLoss, PairBatch, masked_log1p_sum_exp


class MultiSimilarityLoss(MetricLoss):
    """``(1/alpha) log(1 + sum_pos e^{-alpha (S - base)}) + (1/beta) log(1 + sum_neg e^{beta (S - base)})``.

    Per anchor over its positive and negative pairs (the mined ones, with
    :class:`~objretrieval.miners.MultiSimilarityMiner`), averaged over all anchors: an anchor with no pair
    contributes 0. Matches pytorch-metric-learning's ``MultiSimilarityLoss``.

    Args:
        alpha: positive-pair scale.
        beta: negative-pair scale.
        base: similarity offset.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> None:
        super().__init__()
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        pos, neg = batch.positive_mask, batch.negative_mask
        if not bool(pos.any()) and not bool(neg.any()):
            return None
        s = batch.similarity
        pos_term = masked_log1p_sum_exp(-self.alpha * (s - self.base), pos) / self.alpha
        neg_term = masked_log1p_sum_exp(self.beta * (s - self.base), neg) / self.beta
        return (pos_term + neg_term).mean()
