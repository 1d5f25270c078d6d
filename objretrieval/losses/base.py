"""The base class of every metric-learning loss: it owns ``forward``; a loss implements ``compute_loss``.

``forward`` validates the inputs (shapes, dtypes, finite values, integer labels), moves labels to the
embeddings' device, computes in float32 (float64 stays float64) with autocast disabled so half-precision
training is safe, L2-normalises, turns mined pairs or triplets into masks or index vectors, and returns a
zero loss that keeps its graph when a batch offers nothing to learn from. The call convention is
pytorch-metric-learning's: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from objretrieval.batch import MinedPairs, MinedTriplets, PairBatch, make_pair_batch


class MetricLoss(nn.Module):
    """Base class: subclasses implement :meth:`compute_loss` on a :class:`PairBatch`.

    Class attributes a subclass may override:
        needs_two_classes: the loss compares samples with each other, so a batch of one class is an error.
        supports_ref: the loss accepts ``ref_emb``/``ref_labels`` (e.g. a cross-batch memory).
        accepts_mined: kinds of mined structure the loss uses (pairs and/or triplets).

    Attributes:
        normalize_embeddings: L2-normalise embeddings (and references) first.
        num_empty_batches: how many batches offered no valid pair or triplet (a zero loss was returned).
    """

    needs_two_classes: ClassVar[bool] = True
    supports_ref: ClassVar[bool] = True
    accepts_mined: ClassVar[tuple[type, ...]] = (MinedPairs, MinedTriplets)

    def __init__(self, *, normalize_embeddings: bool = True) -> None:
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        self.num_empty_batches = 0

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            embeddings: (N, D) floating tensor (float16/bfloat16 are computed in float32).
            labels: (N,) integer class labels.
            indices_tuple: mined pairs/triplets: :class:`~objretrieval.miners.MinedPairs`,
                :class:`~objretrieval.miners.MinedTriplets`, or pytorch-metric-learning index tuples.
            ref_emb: optional (M, D) reference embeddings to compare against instead of the batch itself.
            ref_labels: (M,) labels of ``ref_emb``.

        Returns:
            A scalar tensor (float32, or float64 for float64 inputs).
        """
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        with torch.autocast(embeddings.device.type, enabled=False):
            loss = self.compute_loss(
                self.prepare_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            )
        if loss is None:
            return self._empty(embeddings)
        return loss

    def prepare_batch(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> PairBatch:
        """Validate and normalise the inputs of :meth:`forward` into the :class:`PairBatch` losses consume."""
        if ref_emb is not None and not self.supports_ref:
            raise ValueError(f"{type(self).__name__} does not support ref_emb/ref_labels")
        batch = make_pair_batch(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, normalize=self.normalize_embeddings
        )
        y, ry = batch.labels, batch.ref_labels
        if self.needs_two_classes and bool((torch.cat([y, ry]) == y[0]).all()):
            raise ValueError(
                f"labels: all {y.shape[0]} samples share one class; {type(self).__name__} compares "
                "classes with each other and needs at least two in a batch"
            )
        if batch.mined is not None and not isinstance(batch.mined, self.accepts_mined):
            raise TypeError(f"{type(self).__name__} cannot use {type(batch.mined).__name__}")
        return batch

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        """The loss of one batch, or None when the batch has no valid pair/triplet."""
        raise NotImplementedError

    def _empty(self, x: Tensor) -> Tensor:
        self.num_empty_batches += 1
        warnings.warn(
            f"{type(self).__name__}: no valid pair or triplet in this batch; returning a zero loss "
            f"({self.num_empty_batches} such batches so far)",
            RuntimeWarning,
            stacklevel=3,
        )
        return (x * 0).sum().to(torch.promote_types(x.dtype, torch.float32))


class ParametricLoss(MetricLoss):
    """A loss with its own learnable parameters (proxies, margins), optimised at a scaled learning rate."""

    #: Learning-rate multiplier used by :meth:`param_groups` when none is given.
    default_lr_multiplier: ClassVar[float] = 1.0
    #: Weight decay of the loss parameters (None: the optimiser's default).
    weight_decay: ClassVar[float | None] = None

    def param_groups(self, lr: float, multiplier: float | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups for this loss's parameters, to append to the model's groups.

        Args:
            lr: the base learning rate.
            multiplier: learning-rate multiplier (default: :attr:`default_lr_multiplier`).
        """
        group: dict[str, Any] = {
            "params": [p for p in self.parameters() if p.requires_grad],
            "lr": lr * (self.default_lr_multiplier if multiplier is None else multiplier),
        }
        if self.weight_decay is not None:
            group["weight_decay"] = self.weight_decay
        return [group]


def masked_log1p_sum_exp(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log(1 + sum exp(x))`` over the masked entries along ``dim``: 0 where none, stable, no NaN gradients."""
    x = x.masked_fill(~mask, float("-inf"))
    shift = x.amax(dim=dim, keepdim=True).clamp(min=0.0)  # the "1" is exp(0), part of the max
    total = torch.exp(-shift).squeeze(dim) + torch.exp(x - shift).sum(dim=dim)
    return shift.squeeze(dim) + torch.log(total)
