"""The base of the losses with a tiled path (:mod:`objretrieval.kernels.pairwise_losses`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from objretrieval.kernels.dispatch import KernelBackend
from objretrieval.kernels.pairwise_losses import check_tiled_call
from objretrieval.losses.base import MetricLoss


class TiledPairLoss(MetricLoss):
    """A :class:`MetricLoss` that can also compute the loss of the batch's own pairs tile by tile.

    With ``self.tiled`` (set from ``tiled=``/``backend=`` by
    :func:`~objretrieval.kernels.pairwise_losses.tiled_options`), :meth:`forward` refuses what tiles cannot
    take (mined tuples, reference sets) by name and calls :meth:`tiled_loss` before anything forms the
    (N, N) masks of the dense path; otherwise it is the base class's forward.
    """

    tiled: bool = False
    backend: KernelBackend = "torch"

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ref_self_index: Tensor | None = None,
    ) -> Tensor:
        if not self.tiled:
            return super().forward(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, ref_self_index=ref_self_index
            )
        unsupported = {"indices_tuple": indices_tuple, "ref_emb": ref_emb, "ref_labels": ref_labels}
        check_tiled_call(self, labels, **unsupported, ref_self_index=ref_self_index)
        return self.tiled_loss(embeddings, labels)

    def tiled_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of the batch's own pairs, computed tile by tile."""
        raise NotImplementedError
