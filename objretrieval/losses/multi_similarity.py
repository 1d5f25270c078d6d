"""Multi-similarity loss (Wang et al., CVPR 2019)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison
from objretrieval.losses.base import MetricLoss, PairBatch, Reduction, masked_log1p_sum_exp, reduction_divisor


class MultiSimilarityLoss(MetricLoss):
    """``(1/alpha) log(1 + sum_pos e^{-alpha (S - base)}) + (1/beta) log(1 + sum_neg e^{beta (S - base)})``.

    Per anchor over its positive and negative pairs (the mined ones, with
    :class:`~objretrieval.miners.MultiSimilarityMiner`; mined triplets count as their a-p and a-n pairs),
    averaged over all anchors: an anchor with no pair contributes 0. Matches pytorch-metric-learning's
    ``MultiSimilarityLoss``.

    Args:
        alpha: positive-pair scale (> 0).
        beta: negative-pair scale (> 0).
        base: similarity offset, in [-1, 1].
        reduction: over anchors, ``"mean"`` (PML's default ``MeanReducer``), ``"mean_nonzero"`` (over the
            anchors with a positive loss) or ``"sum"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.

    The defaults are PML's. Preset (:meth:`~objretrieval.losses.MetricLoss.from_preset`): ``"liao2023"``, the
    "MS+miner" baseline of Liao et al. (ICML 2023, 224 code ``MultiSimilarityLossWithMiner``): the same
    values, with ``MultiSimilarityMiner(epsilon=0.1)`` passed by the caller.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {"liao2023": {"alpha": 2.0, "beta": 50.0, "base": 0.5}}

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        *,
        reduction: Reduction = "mean",
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.alpha = check_number(alpha, "alpha", low=0.0, low_open=True)
        self.beta = check_number(beta, "beta", low=0.0, low_open=True)
        self.base = check_number(base, "base", low=-1.0, high=1.0)
        self.reduction: Reduction = check_choice(reduction, "reduction", Reduction)

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        pos, neg = batch.positive_mask, batch.negative_mask
        if not bool(pos.any()) and not bool(neg.any()):
            return None
        s = batch.similarity
        pos_term = masked_log1p_sum_exp(-self.alpha * (s - self.base), pos) / self.alpha
        neg_term = masked_log1p_sum_exp(self.beta * (s - self.base), neg) / self.beta
        per_anchor = pos_term + neg_term
        divisor = reduction_divisor(self.reduction, (per_anchor > 0).sum(), per_anchor.shape[0])
        return per_anchor.sum() / divisor
