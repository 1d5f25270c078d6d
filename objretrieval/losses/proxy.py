"""Proxy-based losses: Proxy-Anchor (Kim et al., CVPR 2020) and Proxy-NCA (Movshovitz-Attias et al., ICCV 2017).

Each class has a learnable proxy; the losses compare embeddings with proxies instead of with each other, so
one class per batch is fine. Proxies train at a larger learning rate: use :meth:`param_groups`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval.losses.base import PairBatch, ParametricLoss, masked_log1p_sum_exp


class _ProxyLoss(ParametricLoss):
    needs_two_classes: ClassVar[bool] = False
    supports_ref: ClassVar[bool] = False
    accepts_mined: ClassVar[tuple[type, ...]] = ()
    default_lr_multiplier: ClassVar[float] = 100.0  # the proxy learning rate of the papers' code

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(
                f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}"
            )
        self.num_classes = int(num_classes)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))

    def _one_hot(self, batch: PairBatch) -> Tensor:
        y = batch.labels
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}), got min {int(y.min())}, "
                f"max {int(y.max())}"
            )
        if batch.embeddings.shape[1] != self.proxies.shape[1]:
            raise ValueError(
                f"embeddings have dim {batch.embeddings.shape[1]} but the proxies have "
                f"{self.proxies.shape[1]}"
            )
        return F.one_hot(y, self.num_classes).bool()

    def _proxies(self, batch: PairBatch) -> Tensor:
        return F.normalize(self.proxies.to(batch.embeddings.dtype), dim=1)


class ProxyAnchorLoss(_ProxyLoss):
    """Proxy-Anchor: each proxy pulls its class's samples and pushes the others.

    ``(1/|C+|) sum_{c in C+} log(1 + sum_{y_i = c} e^{-alpha (cos_ic - margin)})
    + (1/C) sum_c log(1 + sum_{y_i != c} e^{alpha (cos_ic + margin)})``, C+ = classes present in the batch.
    Proxies start kaiming-normal (fan-out). Unlike the contextual-similarity 224 code, which passed the number
    of *images* as the number of classes, C is the true number of classes here.

    Args:
        num_classes: number of classes (labels must lie in [0, num_classes)).
        embedding_size: embedding dimension.
        margin: delta.
        alpha: scale.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0
    ) -> None:
        super().__init__(num_classes, embedding_size)
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.margin, self.alpha = float(margin), float(alpha)

    def compute_loss(self, batch: PairBatch) -> Tensor:
        member = self._one_hot(batch)
        cos = batch.embeddings @ self._proxies(batch).T
        # log(1 + sum exp(z)) per proxy, computed stably: e^{alpha * 1.1} would overflow half precision
        pos = masked_log1p_sum_exp(-self.alpha * (cos - self.margin), member, dim=0)
        neg = masked_log1p_sum_exp(self.alpha * (cos + self.margin), ~member, dim=0)
        present = member.any(dim=0)
        return pos[present].sum() / present.sum() + neg.sum() / self.num_classes


class ProxyNCALoss(_ProxyLoss):
    """Proxy-NCA: softmax over ``-scale * ||f - p_c||^2`` of normalised embeddings and proxies.

    ``mean_i -log softmax_c(-scale ||f_i - p_c||^2)[y_i]``, as pytorch-metric-learning's ``ProxyNCALoss`` (which
    the contextual-similarity code uses with scale 9 or 10). Proxies start standard normal.

    Args:
        num_classes: number of classes (labels must lie in [0, num_classes)).
        embedding_size: embedding dimension.
        softmax_scale: the scale.
    """

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 9.0) -> None:
        super().__init__(num_classes, embedding_size)
        nn.init.normal_(self.proxies)
        self.softmax_scale = float(softmax_scale)

    def compute_loss(self, batch: PairBatch) -> Tensor:
        self._one_hot(batch)
        f, p = batch.embeddings, self._proxies(batch)
        sq_dist = (f.pow(2).sum(1)[:, None] + p.pow(2).sum(1)[None, :] - 2.0 * f @ p.T).clamp(min=0.0)
        return F.cross_entropy(-self.softmax_scale * sq_dist, batch.labels)
