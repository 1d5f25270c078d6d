"""The base class of miners: validate the batch, then select pairs or triplets without gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from objretrieval.batch import LabelComparison, Mined, MinedPairs, MinedTriplets, PairBatch, make_pair_batch
from objretrieval.display import ConfigRepr
from objretrieval.precision import full_precision

__all__ = ["Mined", "MinedPairs", "MinedTriplets", "Miner"]


class Miner(ConfigRepr, nn.Module):
    """Base class of miners: :meth:`mine` selects pairs or triplets of a :class:`~objretrieval.batch.PairBatch`.

    Call like pytorch-metric-learning's miners: ``miner(embeddings, labels, ref_emb=None, ref_labels=None)``;
    ``ref_self_index`` marks each row's own column in ``ref_emb`` (see :meth:`MetricLoss.forward`).
    Embeddings are L2-normalised and computed in the dtype of :mod:`objretrieval.precision` (float32,
    float64 stays), without gradient.

    Args:
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix replacing
            label equality (e.g. hierarchical labels).
    """

    def __init__(self, *, label_comparison: LabelComparison | None = None) -> None:
        super().__init__()
        if label_comparison is not None and not callable(label_comparison):
            raise TypeError(f"label_comparison must be callable, got {type(label_comparison).__name__}")
        self.label_comparison = label_comparison

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ref_self_index: Tensor | None = None,
    ) -> Mined:
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        with torch.no_grad(), full_precision(embeddings.device):
            batch = make_pair_batch(
                embeddings,
                labels,
                ref_emb=ref_emb,
                ref_labels=ref_labels,
                label_comparison=self.label_comparison,
                ref_self_index=ref_self_index,
            )
            return self.mine(batch)

    def mine(self, batch: PairBatch) -> Mined:
        """Select pairs or triplets from a batch of normalised (N, D) embeddings against (M, D) references."""
        raise NotImplementedError
