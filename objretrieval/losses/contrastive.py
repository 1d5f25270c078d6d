"""Margin contrastive loss on cosine similarities, and the similarity regulariser of Liao et al. (2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from objretrieval.losses.base import MetricLoss, PairBatch


class _MarginContrastive(torch.autograd.Function):
    """The margin contrastive loss with its closed-form gradient: -1/n+ on violating positive pairs, +1/n- on
    violating negative pairs. Two passes over the (N, M) matrix instead of autograd's chain of temporaries."""

    @staticmethod
    def forward(
        ctx: Any, s: Tensor, positive: Tensor, negative: Tensor, pos_margin: float, neg_margin: float
    ) -> Tensor:
        pos_active = positive & (s < pos_margin)
        neg_active = negative & (s > neg_margin)
        # count_nonzero is an order of magnitude faster than summing a bool tensor (which converts to int64)
        count_pos = torch.count_nonzero(pos_active).to(s.dtype)
        count_neg = torch.count_nonzero(neg_active).to(s.dtype)
        pos_sum = torch.where(pos_active, pos_margin - s, 0.0).sum()  # sums of the hinges themselves:
        neg_sum = torch.where(neg_active, s - neg_margin, 0.0).sum()  # no cancellation in float32
        n_pos, n_neg = count_pos.clamp(min=1), count_neg.clamp(min=1)
        ctx.save_for_backward(pos_active, neg_active, n_pos, n_neg)
        return pos_sum / n_pos + neg_sum / n_neg

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        pos_active, neg_active, n_pos, n_neg = ctx.saved_tensors
        weights = torch.where(pos_active, -grad / n_pos, torch.where(neg_active, grad / n_neg, 0.0))
        return weights, None, None, None, None


def margin_contrastive(
    similarity: Tensor, positive: Tensor, negative: Tensor, pos_margin: float, neg_margin: float
) -> Tensor | None:
    """Mean hinge over the violating positive pairs plus the same over the violating negative pairs.

    Positive pairs are penalised below ``pos_margin``, negative pairs above ``neg_margin``; each half is
    averaged over its currently violating pairs (a half with none contributes 0).

    Args:
        similarity: (N, M) cosine similarities.
        positive: (N, M) bool mask of positive pairs.
        negative: (N, M) bool mask of negative pairs.
        pos_margin: similarity positives should exceed.
        neg_margin: similarity negatives should stay below.

    Returns:
        The scalar loss, or None when the masks select no pair at all.
    """
    if not bool(positive.any()) and not bool(negative.any()):
        return None
    # the denominators (numbers of currently violating pairs) carry no gradient
    return _MarginContrastive.apply(similarity, positive, negative, float(pos_margin), float(neg_margin))


def similarity_regularizer(similarity: Tensor, target: float) -> Tensor:
    """``(mean(S) - target)^2`` over all entries of S, the diagonal included (as in the paper's code)."""
    return (similarity.mean() - target).square()


class ContrastiveLoss(MetricLoss):
    """Contrastive loss with margins on cosine similarity, averaged over the violating pairs.

    ``mean_{S_ij < m+} (m+ - S_ij) + mean_{S_ij > m-} (S_ij - m-)`` over positive / negative pairs (self-pairs
    excluded). The defaults 0.9 / 0.6 are the "Contrastive" baseline of Liao et al. (ICML 2023). This equals
    pytorch-metric-learning's ``ContrastiveLoss(pos_margin, neg_margin, distance=CosineSimilarity())``.

    Args:
        pos_margin: similarity positive pairs should exceed.
        neg_margin: similarity negative pairs should stay below.
    """

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.6) -> None:
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        return margin_contrastive(
            batch.similarity, batch.positive_mask, batch.negative_mask, self.pos_margin, self.neg_margin
        )
