"""The base class of miners: validate the batch, then select pairs or triplets without gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from objretrieval.batch import Mined, MinedPairs, MinedTriplets, PairBatch, make_pair_batch

__all__ = ["Mined", "MinedPairs", "MinedTriplets", "Miner"]


class Miner(nn.Module):
    """Base class of miners: :meth:`mine` selects pairs or triplets of a :class:`~objretrieval.batch.PairBatch`.

    Call like pytorch-metric-learning's miners: ``miner(embeddings, labels, ref_emb=None, ref_labels=None)``.
    Embeddings are L2-normalised and computed in float32 (float64 stays), without gradient.
    """

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Mined:
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
            return self.mine(make_pair_batch(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels))

    def mine(self, batch: PairBatch) -> Mined:
        """Select pairs or triplets from a batch of normalised (N, D) embeddings against (M, D) references."""
        raise NotImplementedError
