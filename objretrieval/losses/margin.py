"""Margin loss with learnable per-class margins (Wu et al., "Sampling Matters", ICCV 2017), as MIC trains it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from objretrieval._validation import check_choice, check_number, check_positive_int
from objretrieval.batch import LabelComparison, MinedPairs, MinedTriplets
from objretrieval.losses.base import PairBatch, ParametricLoss, Reduction, reduction_divisor

Normalizer = Literal["active_terms", "active_triplets"]


class MarginLoss(ParametricLoss):
    """``relu(d_ap - beta_a + alpha) + relu(beta_a - d_an + alpha)`` summed over triplets / active count.

    ``beta_a`` is the margin of the anchor's class (learnable, one per class, starting at ``beta``); distances
    are ``sqrt(||x - y||^2 + 1e-8)``. Triplets come from a miner (MIC uses
    :class:`~objretrieval.miners.DistanceWeightedMiner`); mined pairs give the triplets of an anchor's mined
    positive and negative pairs (as PML); without either, every valid triplet of the batch is used, computed
    in O(B^2) because the two terms separate.

    The sum is divided by the number of active terms, ``#(pos > 0) + #(neg > 0)``, as in the paper's code on
    torch 1.0 (with which MIC's numbers were produced). On torch >= 1.2 the official code counts triplets
    with any active term instead (``bool + bool`` became a logical or): ``normalizer="active_triplets"``.

    Args:
        num_classes: number of classes (labels must lie in [0, num_classes)) when margins are learnt.
        margin: alpha, the fixed margin around beta.
        beta: initial class margin.
        nu: weight of the margin regulariser ``nu * sum(beta_a)`` (0 in MIC), divided like the loss.
        learn_beta: learn one margin per class (needs ``num_classes``); if False, beta is one constant. Default:
            learn them exactly when ``num_classes`` is given, so ``MarginLoss()`` has PML's fixed margin.
        normalizer: ``"active_terms"`` or ``"active_triplets"`` (see above), for ``reduction="mean_nonzero"``.
        normalize_embeddings: L2-normalise first (MIC's network already outputs unit vectors).
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix (the margin
            beta_a is still the anchor's own label's).
        reduction: ``"mean_nonzero"`` (divide by the active count of ``normalizer``; PML's default
            ``DivisorReducer``), ``"mean"`` (by the number of triplets, PML's ``MeanReducer``) or ``"sum"``.

    The defaults (alpha 0.2, beta 1.2) are the paper's. ``MarginLoss()`` keeps beta fixed, as PML's default:
    on the digits benchmark (``benchmarks/bench_training.py``) learnt per-class margins matched a fixed one from
    a random start (74.5 against 75.7 Recall@1) but cost 3.5 points from a pretrained start (72.5 against 76.0),
    the margins moving while the embedding is already good. ``MarginLoss(num_classes)`` learns them, as MIC.
    Preset (:meth:`~objretrieval.losses.MetricLoss.from_preset`): ``"mic"``, MIC's setting (Roth et al.,
    ICCV 2019: the same values, learnt margins, ``nu`` 0, counted over active terms; pass ``num_classes``).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "mic": {"margin": 0.2, "beta": 1.2, "nu": 0.0, "normalizer": "active_terms", "learn_beta": True}
    }

    accepts_mined: ClassVar[tuple[type, ...]] = (MinedPairs, MinedTriplets)
    # beta is a distance and Adam steps by about lr whatever the gradient: at 50x (MIC's 5e-4 for a 1e-5
    # network, MICTraining.param_groups) a 1e-3 network moves it by 0.05 a step and trains worse from scratch
    default_lr_multiplier: ClassVar[float] = 1.0
    weight_decay: ClassVar[float | None] = 0.0

    def __init__(
        self,
        num_classes: int | None = None,
        margin: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        learn_beta: bool | None = None,
        normalizer: Normalizer = "active_terms",
        normalize_embeddings: bool = True,
        *,
        label_comparison: LabelComparison | None = None,
        reduction: Reduction = "mean_nonzero",
    ) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, label_comparison=label_comparison)
        self.reduction: Reduction = check_choice(reduction, "reduction", Reduction)
        learn_beta = num_classes is not None if learn_beta is None else bool(learn_beta)
        if learn_beta and num_classes is None:
            raise ValueError("num_classes (>= 1) is required to learn per-class margins (learn_beta=True)")
        if num_classes is not None:
            num_classes = check_positive_int(num_classes, "num_classes")
        self.margin = check_number(margin, "margin")
        self.nu = check_number(nu, "nu", low=0.0)
        beta = check_number(beta, "beta", low=0.0, low_open=True)
        self.learn_beta = learn_beta
        self.indexes_classes = learn_beta  # labels index the per-class margins
        self.normalizer: Normalizer = check_choice(
            normalizer,
            "normalizer",
            ("active_terms", "active_triplets"),
        )
        self.num_classes = num_classes
        if learn_beta:
            self.beta = nn.Parameter(torch.full((int(num_classes),), float(beta)))  # type: ignore[arg-type]
        else:
            self.register_buffer("beta", torch.tensor(float(beta)))

    def _anchor_beta(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """Each anchor's margin (labels were range-checked by the base class when margins are learnt)."""
        if not self.learn_beta:
            return self.beta.to(dtype).expand_as(labels)
        return self.beta.to(dtype)[labels]

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        triplets = batch.triplets()
        if triplets is not None:
            return self._given(batch, triplets)
        return self._all(batch)

    def _given(self, batch: PairBatch, triplets: MinedTriplets) -> Tensor | None:
        a, p, n = triplets
        if a.numel() == 0:
            return None
        x, ref = batch.embeddings, batch.ref
        d_ap = ((x[a] - ref[p]).pow(2).sum(1) + 1e-8).sqrt()
        d_an = ((x[a] - ref[n]).pow(2).sum(1) + 1e-8).sqrt()
        beta = self._anchor_beta(batch.labels[a], x.dtype)
        pos = (d_ap - beta + self.margin).clamp(min=0)
        neg = (beta - d_an + self.margin).clamp(min=0)
        if self.normalizer == "active_terms":
            count = (pos > 0).sum() + (neg > 0).sum()
        else:
            count = ((pos > 0) | (neg > 0)).sum()
        return ((pos + neg).sum() + self.nu * beta.sum()) / reduction_divisor(
            self.reduction, count, a.numel()
        )

    def _all(self, batch: PairBatch) -> Tensor | None:
        """Every (anchor, positive, negative): the terms separate, sum_{a,p,n} = sum_{a,p} N_a + sum_{a,n} P_a."""
        pos_mask, neg_mask = batch.positive_mask, batch.negative_mask
        num_pos, num_neg = pos_mask.sum(1), neg_mask.sum(1)
        if not bool(((num_pos > 0) & (num_neg > 0)).any()):
            return None
        d = batch.distances(floor=0.0, offset=1e-8)  # MIC's sqrt(||x - y||^2 + 1e-8)
        beta = self._anchor_beta(batch.labels, d.dtype)[:, None]
        pos = (d - beta + self.margin).clamp(min=0) * pos_mask
        neg = (beta - d + self.margin).clamp(min=0) * neg_mask
        with torch.no_grad():
            pos_active, neg_active = (pos > 0).sum(1), (neg > 0).sum(1)
            if self.normalizer == "active_terms":
                count = (pos_active * num_neg + neg_active * num_pos).sum()
            else:  # triplets minus those where neither term is active
                count = (num_pos * num_neg - (num_pos - pos_active) * (num_neg - neg_active)).sum()
        total = (pos.sum(1) * num_neg + neg.sum(1) * num_pos).sum()
        reg = self.nu * (beta.squeeze(1) * num_pos * num_neg).sum()
        return (total + reg) / reduction_divisor(self.reduction, count, (num_pos * num_neg).sum())
