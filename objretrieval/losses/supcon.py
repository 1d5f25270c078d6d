"""Supervised contrastive loss (Khosla et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison
from objretrieval.kernels.dispatch import KernelBackend
from objretrieval.kernels.pairwise_losses import tiled_options, tiled_supcon_loss
from objretrieval.losses.base import PairBatch, Reduction, reduction_divisor
from objretrieval.losses.tiled import TiledPairLoss


def supervised_contrastive(
    similarity: Tensor,
    positive: Tensor,
    negative: Tensor,
    temperature: float,
    reduction: Reduction = "mean_nonzero",
) -> Tensor | None:
    """The supervised contrastive loss of a similarity matrix: each anchor's positives in a softmax over its pairs.

    With logits ``l = similarity / temperature``, anchor ``i`` with positives ``P(i)`` and pairs
    ``A(i) = P(i) + N(i)`` (its positives and negatives) has
    ``loss_i = logsumexp_{a in A(i)} l_ia - mean_{p in P(i)} l_ip``, which is
    ``-mean_{p in P(i)} log(exp(l_ip) / sum_{a in A(i)} exp(l_ia))``; an anchor without positives has 0.
    By default the mean is over the anchors with a positive loss (pytorch-metric-learning's
    ``AvgNonZeroReducer``, the default of its ``SupConLoss``).

    Args:
        similarity: (N, M) cosine similarities.
        positive: (N, M) bool mask of positive pairs (never an anchor with itself).
        negative: (N, M) bool mask of negative pairs.
        temperature: the softmax temperature (> 0).
        reduction: over anchors, ``"mean_nonzero"`` (over those with a positive loss), ``"mean"`` (over all
            of them, PML's ``MeanReducer``) or ``"sum"``.

    Returns:
        The scalar loss, or None when the masks hold no positive or no negative pair (nothing to contrast;
        pytorch-metric-learning's ``SupConLoss`` returns 0 then).
    """
    if not bool(positive.any()) or not bool(negative.any()):
        return None
    logits = similarity / temperature
    # torch.logsumexp subtracts each row's max first, the stabilisation of PML's explicit shift. Entries
    # outside A(i) get the lowest finite value, not -inf: a row without pairs then has finite (unused)
    # terms, where -inf would make its zero gradient NaN.
    pairs = logits.masked_fill(~(positive | negative), torch.finfo(logits.dtype).min)
    log_norm = torch.logsumexp(pairs, dim=1)
    num_pos = positive.sum(1)
    mean_pos = torch.where(positive, logits, 0.0).sum(1) / num_pos.clamp(min=1)
    per_anchor = torch.where(num_pos > 0, log_norm - mean_pos, 0.0)
    # never negative (Jensen: log_norm >= mean_pos + log |P(i)|); 0 where one positive is the whole softmax
    # (e.g. an anchor's only mined pair), which "mean_nonzero" leaves out as PML's reducer does
    divisor = reduction_divisor(reduction, torch.count_nonzero(per_anchor > 0), per_anchor.shape[0])
    return per_anchor.sum() / divisor


class SupConLoss(TiledPairLoss):
    """Supervised contrastive loss (SupCon): each anchor's positives against all of its pairs, in a softmax.

    With cosine similarities ``S`` of the L2-normalised embeddings and logits ``l = S / temperature``, anchor
    ``i`` with positives ``P(i)`` (same class, itself excluded) and pairs ``A(i)`` (every other sample:
    positives and negatives) contributes
    ``-1/|P(i)| sum_{p in P(i)} log(exp(l_ip) / sum_{a in A(i)} exp(l_ia))``, averaged over the anchors with
    a positive loss; an anchor without positives contributes nothing (:func:`supervised_contrastive`).
    This is pytorch-metric-learning's ``SupConLoss(temperature)`` with its defaults (cosine similarity,
    ``AvgNonZeroReducer``), and Khosla et al.'s ``L_out^sup`` with every view a row of the batch, labelled
    with its class.

    With mined pairs, ``P(i)`` and ``A(i)`` are the mined pairs (mined triplets: their a-p and a-n pairs), as in
    PML. A batch without a positive pair, or without a negative one, returns a zero loss (PML returns 0
    too); a batch of one class is an error (PML returns 0), as for every loss that compares classes.

    ``tiled=True``, or a ``backend`` other than ``"torch"``, computes the loss tile by tile in O(N *
    tile_size) memory instead of the dense (N, N) logits
    (:func:`~objretrieval.kernels.pairwise_losses.tiled_supcon_loss`; ``"triton"``/``"auto"`` pick its kernel
    as :func:`~objretrieval.kernels.dispatch.resolve_backend` does). That path takes the plain batch only (no
    ``ref_emb``, ``indices_tuple`` or ``label_comparison``) and the default ``reduction``.

    Args:
        temperature: the softmax temperature (> 0); 0.1, PML's default and the paper's.
        reduction: over anchors, ``"mean_nonzero"`` (PML's default ``AvgNonZeroReducer``), ``"mean"`` or
            ``"sum"``.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
        backend: ``"torch"`` (the dense path unless ``tiled``), ``"triton"`` or ``"auto"`` (the tiled path).
        tiled: the tiled path with ``backend`` (``"torch"``: its torch tiles, any device).
        tile_size: rows per tile of the tiled path (None: its default).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        reduction: Reduction = "mean_nonzero",
        label_comparison: LabelComparison | None = None,
        backend: KernelBackend = "torch",
        tiled: bool = False,
        tile_size: int | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.temperature = check_number(temperature, "temperature", low=0.0, low_open=True)
        self.reduction: Reduction = check_choice(reduction, "reduction", Reduction)
        self.backend, self.tiled, self.tile_size = tiled_options(backend, tiled, tile_size, label_comparison)
        if self.tiled and self.reduction != "mean_nonzero":
            raise ValueError(
                f"reduction: the tiled SupConLoss (tiled=True or backend={backend!r}) computes PML's default "
                f"reduction 'mean_nonzero' only, got {reduction!r}; use backend='torch', tiled=False"
            )

    def tiled_loss(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, bool]:
        return tiled_supcon_loss(
            embeddings,
            labels,
            temperature=self.temperature,
            tile_size=self.tile_size,
            backend=self.backend,
            return_empty=True,
        )

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        return supervised_contrastive(
            batch.similarity, batch.positive_mask, batch.negative_mask, self.temperature, self.reduction
        )
