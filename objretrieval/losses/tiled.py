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
    :func:`~objretrieval.kernels.pairwise_losses.tiled_options`), :meth:`MetricLoss.forward` hands the call to
    :meth:`tiled_forward` before anything forms the (N, N) masks of the dense path: it refuses by name what
    tiles cannot take (mined tuples, reference sets) and calls :meth:`tiled_loss`. A batch the dense path
    finds empty (no valid pair, by the same rule, decided from the tiles' row statistics) gives None, which
    ``forward`` turns into the dense path's warning, count and zero loss.
    """

    backend: KernelBackend = "torch"

    def tiled_forward(self, embeddings: Tensor, labels: Tensor, **arguments: Any) -> Tensor | None:
        check_tiled_call(self, embeddings, labels, **arguments)
        loss, empty = self.tiled_loss(embeddings, labels)
        return None if empty else loss

    def tiled_loss(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, bool]:
        """The loss of the batch's own pairs, computed tile by tile, and whether the batch is empty (a tiled
        function's ``return_empty=True``)."""
        raise NotImplementedError
