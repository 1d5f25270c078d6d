"""Margin contrastive loss on cosine similarities, and the similarity regulariser of Liao et al. (2023)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison, PairCounts
from objretrieval.kernels.dispatch import KernelBackend
from objretrieval.kernels.pairwise_losses import tiled_contrastive_loss, tiled_options
from objretrieval.losses.base import PairBatch, Reduction, reduction_divisor
from objretrieval.losses.tiled import TiledPairLoss


def _half(active: Tensor, mask: Tensor, hinge: Tensor, weight: Tensor | None, reduction: Reduction):
    """Sum of one half's hinges and its divisor; ``weight`` counts repeated mined pairs."""
    if weight is None:
        # count_nonzero is an order of magnitude faster than summing a bool tensor (which converts to int64)
        total = torch.where(active, hinge, 0.0).sum()  # the hinges themselves: no cancellation in float32
        num_nonzero = torch.count_nonzero(active).to(hinge.dtype)
        num_all = torch.count_nonzero(mask).to(hinge.dtype) if reduction == "mean" else 0
    else:
        w = weight.to(hinge.dtype)
        total = torch.where(active, w * hinge, 0.0).sum()
        num_nonzero = torch.where(active, w, 0.0).sum()
        num_all = torch.where(mask, w, 0.0).sum() if reduction == "mean" else 0
    return total, reduction_divisor(reduction, num_nonzero, num_all)


class _MarginContrastive(torch.autograd.Function):
    """The margin contrastive loss with its closed-form gradient: -w/n+ on violating positive pairs, +w/n- on
    violating negative pairs (w: multiplicity, n: divisor). Two passes over the (N, M) matrix instead of
    autograd's chain of temporaries."""

    @staticmethod
    def forward(
        ctx: Any,
        s: Tensor,
        positive: Tensor,
        negative: Tensor,
        pos_margin: float,
        neg_margin: float,
        reduction: Reduction,
        pos_weight: Tensor | None,
        neg_weight: Tensor | None,
    ) -> Tensor:
        pos_active = positive & (s < pos_margin)
        neg_active = negative & (s > neg_margin)
        pos_sum, n_pos = _half(pos_active, positive, pos_margin - s, pos_weight, reduction)
        neg_sum, n_neg = _half(neg_active, negative, s - neg_margin, neg_weight, reduction)
        ctx.save_for_backward(pos_active, neg_active, n_pos, n_neg, pos_weight, neg_weight)
        return pos_sum / n_pos + neg_sum / n_neg

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        pos_active, neg_active, n_pos, n_neg, pos_weight, neg_weight = ctx.saved_tensors
        pos_grad = -grad / n_pos if pos_weight is None else -grad * pos_weight / n_pos
        neg_grad = grad / n_neg if neg_weight is None else grad * neg_weight / n_neg
        weights = torch.where(pos_active, pos_grad, torch.where(neg_active, neg_grad, 0.0))
        return weights, None, None, None, None, None, None, None


def margin_contrastive(
    similarity: Tensor,
    positive: Tensor,
    negative: Tensor,
    pos_margin: float,
    neg_margin: float,
    reduction: Reduction = "mean_nonzero",
    pair_counts: PairCounts | None = None,
) -> Tensor | None:
    """Hinges of the positive pairs below ``pos_margin`` plus those of the negative pairs above ``neg_margin``.

    Each half is reduced on its own (see :data:`~objretrieval.losses.base.Reduction`): by default averaged
    over its currently violating pairs (a half with none contributes 0), as pytorch-metric-learning's
    ``ContrastiveLoss`` with its default ``AvgNonZeroReducer``.

    Args:
        similarity: (N, M) cosine similarities.
        positive: (N, M) bool mask of positive pairs.
        negative: (N, M) bool mask of negative pairs.
        pos_margin: similarity positives should exceed.
        neg_margin: similarity negatives should stay below.
        reduction: ``"mean_nonzero"``, ``"mean"`` (over all pairs of the half) or ``"sum"``.
        pair_counts: optional (N, M) multiplicities of the positive and negative pairs (repeated mined pairs
            count that many times, as in PML's pair losses).

    Returns:
        The scalar loss, or None when the masks select no pair at all.
    """
    if not bool(positive.any()) and not bool(negative.any()):
        return None
    pos_weight, neg_weight = (None, None) if pair_counts is None else pair_counts
    # the divisors (numbers of pairs) carry no gradient
    return _MarginContrastive.apply(
        similarity,
        positive,
        negative,
        float(pos_margin),
        float(neg_margin),
        reduction,
        pos_weight,
        neg_weight,
    )


def similarity_regularizer(similarity: Tensor, target: float) -> Tensor:
    """``(mean(S) - target)^2`` over all entries of S, the diagonal included (as in the paper's code)."""
    return (similarity.mean() - target).square()


class ContrastiveLoss(TiledPairLoss):
    """Contrastive loss with margins on cosine similarity, averaged over the violating pairs.

    ``mean_{S_ij < m+} (m+ - S_ij) + mean_{S_ij > m-} (S_ij - m-)`` over positive / negative pairs (self-pairs
    excluded). This equals pytorch-metric-learning's ``ContrastiveLoss(pos_margin, neg_margin,
    distance=CosineSimilarity())``.

    The defaults 1.0 / 0.5 are PML's defaults carried over to cosine similarity: every positive pair is pulled
    (PML's positive distance margin 0) and negatives are pushed below similarity 0.5, i.e. apart to unit
    distance on the sphere (PML's negative margin 1). They train from a random start, where a whole batch is
    nearly one direction; with a positive margin below 1 such a start pulls no positive pair at all until the
    negatives have spread. Preset (:meth:`~objretrieval.losses.MetricLoss.from_preset`):

    - ``"liao2023"``: 0.9 / 0.6, the "Contrastive" baseline of Liao et al. (ICML 2023), tuned on pretrained
      ResNet-50 features (``shared/specs/contextual.md`` section 2).

    Mined triplets are used as their pairs (a-p positive, a-n negative); a pair mined several times counts
    that many times, as in PML.

    ``tiled=True``, or a ``backend`` other than ``"torch"``, computes the loss tile by tile in O(N x
    tile_size) memory instead of the (N, N) similarities
    (:func:`~objretrieval.kernels.pairwise_losses.tiled_contrastive_loss`; ``"triton"``/``"auto"`` pick its
    kernel as :func:`~objretrieval.kernels.dispatch.resolve_backend` does). That path takes the plain batch
    only: no ``indices_tuple``, ``ref_emb`` or ``label_comparison``.

    Args:
        pos_margin: similarity positive pairs should exceed, in [-1, 1].
        neg_margin: similarity negative pairs should stay below, in [-1, 1].
        reduction: per half, ``"mean_nonzero"`` (over the violating pairs), ``"mean"`` (over all its pairs,
            PML's ``MeanReducer``) or ``"sum"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
        backend: ``"torch"`` (the dense path unless ``tiled``), ``"triton"`` or ``"auto"`` (the tiled path).
        tiled: the tiled path with ``backend`` (``"torch"``: its torch tiles, any device).
        tile_size: rows per tile of the tiled path (None: its default).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {"liao2023": {"pos_margin": 0.9, "neg_margin": 0.6}}

    def __init__(
        self,
        pos_margin: float = 1.0,
        neg_margin: float = 0.5,
        *,
        reduction: Reduction = "mean_nonzero",
        label_comparison: LabelComparison | None = None,
        backend: KernelBackend = "torch",
        tiled: bool = False,
        tile_size: int | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.pos_margin = check_number(pos_margin, "pos_margin", low=-1.0, high=1.0)
        self.neg_margin = check_number(neg_margin, "neg_margin", low=-1.0, high=1.0)
        self.reduction: Reduction = check_choice(reduction, "reduction", Reduction)
        self.backend, self.tiled, self.tile_size = tiled_options(backend, tiled, tile_size, label_comparison)

    def tiled_loss(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, bool]:
        return tiled_contrastive_loss(
            embeddings,
            labels,
            pos_margin=self.pos_margin,
            neg_margin=self.neg_margin,
            reduction=self.reduction,
            tile_size=self.tile_size,
            backend=self.backend,
            return_empty=True,
        )

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        return margin_contrastive(
            batch.similarity,
            batch.positive_mask,
            batch.negative_mask,
            self.pos_margin,
            self.neg_margin,
            self.reduction,
            batch.pair_counts,
        )
