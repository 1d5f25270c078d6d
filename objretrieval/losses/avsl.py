"""AVSL's training losses: one metric loss per level plus one on the propagated distance, weighted per level.

``total = L(final) + sum_l w_l * L(level l)``. The level distances train the embeddings; the final
(propagated) distance trains only the node reliabilities, because AVSL builds it from detached per-node
distances. Two base losses, both on squared distances of normalised embeddings (in [0, 4]):

- :class:`AVSLProxyAnchorLoss` (the paper's main setting): Proxy-Anchor against per-level class proxies.
- :class:`AVSLMarginLoss`: the margin loss on batch pairs with one random positive and the hardest negative
  per anchor (the official ``avsl_margin`` setting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from objretrieval._validation import check_label_range, check_labels, check_number, check_positive_int
from objretrieval.display import ConfigRepr
from objretrieval.losses.base import masked_log1p_sum_exp
from objretrieval.miners.distance_weighted import sample_rows
from objretrieval.models.avsl import AVSL, AttributableSimilarity, AVSLFeatures, LevelDistances
from objretrieval.precision import full_precision, upcast

#: Level weights (w_0, w_1, w_2) of the authors' run scripts.
AVSL_LEVEL_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "cub200": (0.5, 1.0, 0.5),
    "cars196": (1.0, 4.0, 4.0),
    "online_products": (1.0, 4.0, 4.0),
}


class AVSLLossOutput(NamedTuple):
    """The total loss and its parts (scalars).

    Attributes:
        loss: ``final + sum_l w_l * levels[l]``; backpropagate this.
        final: loss on the propagated distance.
        levels: loss on each level's distance, unweighted.
    """

    loss: Tensor
    final: Tensor
    levels: tuple[Tensor, ...]


def proxy_anchor_distance_loss(
    distances: Tensor,
    row_labels: Tensor,
    col_labels: Tensor,
    pos_margin: float,
    neg_margin: float,
    alpha: float,
    exclude_diagonal: bool = False,
) -> Tensor:
    """Proxy-Anchor on a distance matrix (R samples x C proxies or samples), aggregated per column.

    ``mean_{c with positives} log(1 + sum_{i pos} e^{alpha (d_ic - pos_margin)})
    + mean_{all c} log(1 + sum_{i neg} e^{-alpha (d_ic - neg_margin)})``.

    Args:
        distances: (R, C) distances (smaller = more similar).
        row_labels: (R,) labels of the rows.
        col_labels: (C,) labels of the columns.
        pos_margin: delta_p.
        neg_margin: delta_n.
        alpha: scale.
        exclude_diagonal: the rows and columns are the same samples: a sample is not its own positive.
    """
    pos = row_labels[:, None] == col_labels[None, :]
    neg = ~pos
    if exclude_diagonal:
        pos = pos & ~torch.eye(*pos.shape, dtype=torch.bool, device=pos.device)
    pos_term = masked_log1p_sum_exp(alpha * (distances - pos_margin), pos, dim=0)
    neg_term = masked_log1p_sum_exp(-alpha * (distances - neg_margin), neg, dim=0)
    has_pos = pos.any(dim=0)
    pos_loss = pos_term[has_pos].mean() if bool(has_pos.any()) else (distances * 0).sum()
    return pos_loss + neg_term.mean()


def _proxy_anchor_margins(
    pos_margin: float, neg_margin: float, alpha: float, prefix: str = ""
) -> tuple[float, float, float]:
    """Checked (delta_p, delta_n, alpha) of a Proxy-Anchor loss on squared distances in [0, 4]."""
    return (
        check_number(pos_margin, f"{prefix}pos_margin", low=0.0, high=4.0),
        check_number(neg_margin, f"{prefix}neg_margin", low=0.0, high=4.0),
        check_number(alpha, f"{prefix}alpha", low=0.0, low_open=True),
    )


class _AVSLLoss(ConfigRepr, nn.Module):
    """Shared plumbing: input checks, the level weights and the weighted total.

    Attributes:
        last_parts: the unweighted terms of the last call (detached): ``final``, ``level0``, ``level1``, ...
            (the same as the returned :class:`AVSLLossOutput`; the convention every multi-term loss follows).
    """

    #: labels index per-class parameters (proxies, margins) and must lie in [0, num_classes)
    num_classes: int | None = None

    def __init__(self, num_levels: int, level_weights: Sequence[float]) -> None:
        super().__init__()
        num_levels = check_positive_int(num_levels, "num_levels")
        if len(level_weights) != num_levels:
            raise ValueError(
                f"level_weights needs {num_levels} entries (one per level), got {list(level_weights)}"
            )
        self.num_levels = num_levels
        self.level_weights = tuple(check_number(w, "level_weights", low=0.0) for w in level_weights)
        self.last_parts: dict[str, Tensor] = {}

    def _labels(self, features: AVSLFeatures, labels: Tensor) -> Tensor:
        if len(features.embeddings) != self.num_levels:
            raise ValueError(
                f"features have {len(features.embeddings)} levels, this loss expects {self.num_levels}"
            )
        y = check_labels(labels, "labels", len(features), "features")
        if self.num_classes is not None:
            check_label_range(y, "labels", self.num_classes)
        return y.to(features.embeddings[0].device)

    def _total(self, final: Tensor, levels: Sequence[Tensor]) -> AVSLLossOutput:
        total = final + sum(w * lv for w, lv in zip(self.level_weights, levels, strict=True))
        self.last_parts = {
            "final": final.detach(),
            **{f"level{i}": lv.detach() for i, lv in enumerate(levels)},
        }
        return AVSLLossOutput(total, final, tuple(levels))


def _similarity(model: AVSL | AttributableSimilarity) -> AttributableSimilarity:
    return model.similarity if isinstance(model, AVSL) else model


class AVSLProxyAnchorLoss(_AVSLLoss):
    """AVSL with Proxy-Anchor: per-level proxies compared with the batch through the similarity graph.

    Proxies get the batch's mean certainty of their level. With more than ``max_all_proxies`` classes (SOP),
    only the proxies of classes present in the batch are used, as the official code does.

    Args:
        num_classes: number of training classes.
        embed_dim: E.
        num_levels: L.
        level_weights: w_l per level (see :data:`AVSL_LEVEL_WEIGHTS`; CUB (0.5, 1, 0.5), Cars/SOP (1, 4, 4)).
        pos_margin: delta_p of the level losses.
        neg_margin: delta_n of the level losses (SOP: 2.4).
        alpha: scale of the level losses.
        final_pos_margin: delta_p of the final-distance loss.
        final_neg_margin: delta_n of the final-distance loss.
        final_alpha: scale of the final-distance loss.
        max_all_proxies: above this many classes, use only the batch's classes.
    """

    num_classes: int

    def __init__(
        self,
        num_classes: int,
        embed_dim: int = 512,
        num_levels: int = 3,
        level_weights: Sequence[float] = (1.0, 4.0, 4.0),
        pos_margin: float = 1.8,
        neg_margin: float = 2.2,
        alpha: float = 16.0,
        final_pos_margin: float = 1.8,
        final_neg_margin: float = 2.2,
        final_alpha: float = 16.0,
        max_all_proxies: int = 1000,
    ) -> None:
        super().__init__(num_levels, level_weights)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.max_all_proxies = check_positive_int(max_all_proxies, "max_all_proxies")
        self.pos_margin, self.neg_margin, self.alpha = _proxy_anchor_margins(pos_margin, neg_margin, alpha)
        self.final_pos_margin, self.final_neg_margin, self.final_alpha = _proxy_anchor_margins(
            final_pos_margin, final_neg_margin, final_alpha, prefix="final_"
        )
        self.embed_dim = embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.proxies = nn.Parameter(torch.empty(num_levels, self.num_classes, embed_dim))
        for proxy in self.proxies.data:  # the official init, per level
            nn.init.kaiming_normal_(proxy, a=math.sqrt(5))

    @torch.no_grad()
    def load_official_proxies(self, collector_state: Mapping[str, Tensor]) -> None:
        """Copy ``proxy_0``.. from an official ``collectors_collector`` state dict."""
        for lv in range(self.num_levels):
            proxy = collector_state[f"proxy_{lv}"]
            if proxy.shape != self.proxies.shape[1:]:
                raise ValueError(
                    f"proxy_{lv} is {tuple(proxy.shape)}, expected {tuple(self.proxies.shape[1:])}"
                )
            self.proxies[lv].copy_(proxy)

    def distances(
        self, model: AVSL | AttributableSimilarity, features: AVSLFeatures, labels: Tensor
    ) -> tuple[LevelDistances, Tensor]:
        """The (B, C') batch-to-proxy distance matrices and the C' proxy labels they are taken against."""
        y = self._labels(features, labels)
        if self.num_classes <= self.max_all_proxies:
            proxy_labels = torch.arange(self.num_classes, device=y.device)
        else:
            proxy_labels = torch.unique(y)
        proxies = self.proxies[:, proxy_labels].to(features.embeddings[0].dtype)
        proxy_features = AVSLFeatures(
            tuple(proxies.unbind(0)),
            tuple(torch.ones_like(p) * c.mean() for p, c in zip(proxies, features.certainties, strict=True)),
        )
        return _similarity(model)(features, proxy_features), proxy_labels

    def forward(
        self, model: AVSL | AttributableSimilarity, features: AVSLFeatures, labels: Tensor
    ) -> AVSLLossOutput:
        """Args: the model (its similarity graph), the batch's training-mode features, (B,) labels."""
        matrices, proxy_labels = self.distances(model, features, labels)
        y = self._labels(features, labels)
        with full_precision(y.device):
            final = proxy_anchor_distance_loss(
                upcast(matrices.final),
                y,
                proxy_labels,
                self.final_pos_margin,
                self.final_neg_margin,
                self.final_alpha,
            )
            levels = [
                proxy_anchor_distance_loss(
                    upcast(d), y, proxy_labels, self.pos_margin, self.neg_margin, self.alpha
                )
                for d in matrices.levels
            ]
        return self._total(final, levels)


class AVSLPairwiseProxyAnchorLoss(_AVSLLoss):
    """Proxy-Anchor with the batch's own samples as anchors (no proxies; a sample is not its own positive).

    The official collector's non-proxy mode; mostly useful to check that mode, or for very many classes.
    """

    def __init__(
        self,
        num_levels: int = 3,
        level_weights: Sequence[float] = (1.0, 4.0, 4.0),
        pos_margin: float = 1.8,
        neg_margin: float = 2.2,
        alpha: float = 16.0,
    ) -> None:
        super().__init__(num_levels, level_weights)
        self.pos_margin, self.neg_margin, self.alpha = _proxy_anchor_margins(pos_margin, neg_margin, alpha)

    def forward(
        self, model: AVSL | AttributableSimilarity, features: AVSLFeatures, labels: Tensor
    ) -> AVSLLossOutput:
        y = self._labels(features, labels)
        matrices = _similarity(model)(features, features)
        with full_precision(y.device):
            parts = [
                proxy_anchor_distance_loss(
                    upcast(d), y, y, self.pos_margin, self.neg_margin, self.alpha, exclude_diagonal=True
                )
                for d in (matrices.final, *matrices.levels)
            ]
        return self._total(parts[0], parts[1:])


class AVSLMarginLoss(_AVSLLoss):
    """AVSL with the margin loss (Wu et al.) on batch pairs, one set of learnable class margins per matrix.

    For each of the L + 1 distance matrices, every anchor with a positive gets a random positive and the
    hardest negative, where distances below ``min(largest positive distance, hardneg_cutoff)`` count as that
    cutoff (gedml's ``HardSelector``); then ``relu(alpha + d_ap - beta_a) + relu(alpha - d_an + beta_a)``,
    averaged over the active terms (0 when none is active; the official code divides 0 by 0).

    Args:
        num_classes: number of training classes (per-class margins beta).
        num_levels: L.
        level_weights: w_l.
        margin: alpha.
        beta: initial class margin.
        hardneg_cutoff: lower cutoff of the hardest-negative search.
        generator: random generator for the positives.
    """

    num_classes: int

    def __init__(
        self,
        num_classes: int,
        num_levels: int = 3,
        level_weights: Sequence[float] = (1.0, 4.0, 4.0),
        margin: float = 0.2,
        beta: float = 1.2,
        hardneg_cutoff: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_levels, level_weights)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.margin = check_number(margin, "margin")
        self.hardneg_cutoff = check_number(hardneg_cutoff, "hardneg_cutoff", low=0.0)
        self.generator = generator
        beta = check_number(beta, "beta", low=0.0, low_open=True)
        self.beta = nn.Parameter(torch.full((num_levels + 1, self.num_classes), beta))  # final first

    def _margin(self, d: Tensor, y: Tensor, beta: Tensor) -> Tensor:
        same = y[:, None] == y[None, :]
        with torch.no_grad():
            cutoff = min(float(d[same].max()), self.hardneg_cutoff)
            not_self = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
            pos = same & not_self
            anchors = pos.any(dim=1).nonzero().squeeze(1)
            if anchors.numel() == 0:
                return (d * 0).sum()
            positives = sample_rows(pos[anchors].to(d.dtype), 1, self.generator).squeeze(1)
            weights = d.clamp(min=cutoff).masked_fill(same, float("inf"))
            negatives = weights[anchors].argmin(dim=1)
        b = beta[y[anchors]]
        pos_loss = torch.relu(self.margin + d[anchors, positives] - b)
        neg_loss = torch.relu(self.margin - d[anchors, negatives] + b)
        active = (pos_loss > 0).sum() + (neg_loss > 0).sum()
        return (pos_loss.sum() + neg_loss.sum()) / active.clamp(min=1)

    def forward(
        self, model: AVSL | AttributableSimilarity, features: AVSLFeatures, labels: Tensor
    ) -> AVSLLossOutput:
        y = self._labels(features, labels)
        if bool((y == y[0]).all()):
            raise ValueError(
                f"labels: all {y.shape[0]} samples share one class; AVSLMarginLoss needs a negative for "
                "every anchor, so at least two classes in a batch"
            )
        matrices = _similarity(model)(features, features)
        with full_precision(y.device):
            parts = [
                self._margin(upcast(d), y, self.beta[i])
                for i, d in enumerate((matrices.final, *matrices.levels))
            ]
        return self._total(parts[0], parts[1:])
