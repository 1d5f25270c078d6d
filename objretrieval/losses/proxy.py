"""Proxy-based losses: Proxy-Anchor (Kim et al., CVPR 2020) and Proxy-NCA (Movshovitz-Attias et al., ICCV 2017).

Each class has a learnable proxy; the losses compare embeddings with proxies instead of with each other, so
one class per batch is fine. Proxies train at a larger learning rate: use :meth:`param_groups`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_embeddings, check_number, check_positive_int
from objretrieval.losses.base import PairBatch, ParametricLoss, masked_log1p_sum_exp
from objretrieval.precision import full_precision, upcast


class _ProxyLoss(ParametricLoss):
    needs_two_classes: ClassVar[bool] = False
    supports_ref: ClassVar[bool] = False
    accepts_mined: ClassVar[tuple[type, ...]] = ()
    indexes_classes = True
    num_classes: int
    default_lr_multiplier: ClassVar[float] = 100.0  # the proxy learning rate of the papers' code

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.embedding_size = check_positive_int(embedding_size, "embedding_size")
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))

    def _check_dim(self, x: Tensor) -> None:
        if x.shape[1] != self.proxies.shape[1]:
            raise ValueError(f"embeddings have dim {x.shape[1]} but the proxies have {self.proxies.shape[1]}")

    def _one_hot(self, batch: PairBatch) -> Tensor:
        self._check_dim(batch.embeddings)
        return F.one_hot(batch.labels, self.num_classes).bool()

    def _proxies(self, x: Tensor) -> Tensor:
        return F.normalize(self.proxies.to(x.dtype), dim=1)

    def logits(self, x: Tensor) -> Tensor:
        """(N, C) class logits of normalised, upcast (N, D) embeddings; larger means closer to the proxy."""
        raise NotImplementedError

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """(N, num_classes) logits of ``embeddings`` against the proxies (``argmax`` is the nearest class).

        The scores the loss is computed from, in the compute dtype (float32, float64 for float64 input).
        """
        x = check_embeddings(embeddings, "embeddings")
        self._check_dim(x)
        with full_precision(x.device):
            x = upcast(x)
            return self.logits(F.normalize(x, dim=1) if self.normalize_embeddings else x)


class ProxyAnchorLoss(_ProxyLoss):
    """Proxy-Anchor: each proxy pulls its class's samples and pushes the others.

    ``(1/|C+|) sum_{c in C+} log(1 + sum_{y_i = c} e^{-alpha (cos_ic - margin)})
    + (1/C) sum_c log(1 + sum_{y_i != c} e^{alpha (cos_ic + margin)})``, C+ = classes present in the batch.
    Proxies start kaiming-normal (fan-out). Unlike the contextual-similarity 224 code, which passed the number
    of *images* as the number of classes, C is the true number of classes here.

    :meth:`get_logits` returns the cosine similarities to the proxies, as PML's ``get_logits``.

    Args:
        num_classes: number of classes (labels must lie in [0, num_classes)).
        embedding_size: embedding dimension.
        margin: delta, >= 0.
        alpha: scale, > 0.

    The defaults are the paper's (and PML's); they train from a random start. Preset
    (:meth:`~objretrieval.losses.MetricLoss.from_preset`): ``"kim2020"``, Kim et al. (CVPR 2020) and the
    Proxy-Anchor baseline of Liao et al. (ICML 2023): the same values (pass ``num_classes`` and
    ``embedding_size``).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {"kim2020": {"margin": 0.1, "alpha": 32.0}}

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0
    ) -> None:
        super().__init__(num_classes, embedding_size)
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.margin = check_number(margin, "margin", low=0.0)
        self.alpha = check_number(alpha, "alpha", low=0.0, low_open=True)

    def logits(self, x: Tensor) -> Tensor:
        return x @ self._proxies(x).T

    def compute_loss(self, batch: PairBatch) -> Tensor:
        member = self._one_hot(batch)
        cos = self.logits(batch.embeddings)
        # log(1 + sum exp(z)) per proxy, computed stably: e^{alpha * 1.1} would overflow half precision
        pos = masked_log1p_sum_exp(-self.alpha * (cos - self.margin), member, dim=0)
        neg = masked_log1p_sum_exp(self.alpha * (cos + self.margin), ~member, dim=0)
        present = member.any(dim=0)
        return pos[present].sum() / present.sum() + neg.sum() / self.num_classes


class ProxyNCALoss(_ProxyLoss):
    """Proxy-NCA: softmax over ``-scale * ||f - p_c||^2`` of normalised embeddings and proxies.

    ``mean_i -log softmax_c(-scale ||f_i - p_c||^2)[y_i]``, as pytorch-metric-learning's ``ProxyNCALoss`` (which
    the contextual-similarity code uses with scale 9 or 10). Proxies start standard normal.

    :meth:`get_logits` returns the softmax's logits ``-scale * ||f - p_c||^2``; PML's ``get_logits`` returns
    the squared distances themselves (smaller is closer).

    Args:
        num_classes: number of classes (labels must lie in [0, num_classes)).
        embedding_size: embedding dimension.
        softmax_scale: the scale, > 0.

    The default scale 9 trains from a random start (PML's default, 1, ends lower in
    ``benchmarks/bench_training.py``). Presets
    (:meth:`~objretrieval.losses.MetricLoss.from_preset`; pass ``num_classes`` and ``embedding_size``):
    ``"liao2023"``, the Proxy-NCA baseline of Liao et al. (ICML 2023) in their 224 code (scale 9), and
    ``"liao2023_256"``, their 256 code (scale 10) (``shared/specs/contextual.md`` section 2).
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "liao2023": {"softmax_scale": 9.0},
        "liao2023_256": {"softmax_scale": 10.0},
    }

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 9.0) -> None:
        super().__init__(num_classes, embedding_size)
        nn.init.normal_(self.proxies)
        self.softmax_scale = check_number(softmax_scale, "softmax_scale", low=0.0, low_open=True)

    def logits(self, x: Tensor) -> Tensor:
        p = self._proxies(x)
        sq_dist = (x.pow(2).sum(1)[:, None] + p.pow(2).sum(1)[None, :] - 2.0 * x @ p.T).clamp(min=0.0)
        return -self.softmax_scale * sq_dist

    def compute_loss(self, batch: PairBatch) -> Tensor:
        self._one_hot(batch)
        return F.cross_entropy(self.logits(batch.embeddings), batch.labels)
