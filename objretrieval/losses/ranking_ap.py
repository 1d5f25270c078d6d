"""Average-precision surrogates: Smooth-AP (Brown et al., ECCV 2020) and ROADMAP (Ramzi et al., NeurIPS 2021).

Both rank every item of the batch for every query with a smooth step in place of the Heaviside function;
ROADMAP's SupAP keeps the exact step between two relevant items and bounds the rank from above elsewhere.
Memory is O(chunk x B^2) for a query chunk, by construction of the method.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_number
from objretrieval.batch import LabelComparison
from objretrieval.losses.base import MetricLoss, PairBatch
from objretrieval.losses.contrastive import margin_contrastive

RankApproximation = Literal["smooth", "sup", "exact"]

_CHUNK_ELEMENTS = 1 << 24  # elements of one (query chunk, B, B) difference tensor


def _sigmoid(x: Tensor, tau: float) -> Tensor:
    """1 / (1 + exp(-x / tau)) with the exponent clamped to [-50, 50], as the reference implementations."""
    return 1.0 / (1.0 + (-x / tau).clamp(-50.0, 50.0).exp())


def ranking_average_precision(
    similarity: Tensor,
    relevance: Tensor,
    *,
    rank: RankApproximation = "smooth",
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    offset: float = 1.44,
    start: float = 0.5,
    rank_query_itself: bool = False,
) -> Tensor:
    """Per-query AP of a batch ranked against itself, with a smooth rank.

    For query i and relevant item j, rank(j) = 1 + sum_{l != j} h(S_il - S_ij) over the items l of i's list,
    and AP_i = mean over relevant j of rank among relevant items / rank among all items. ``h`` is:

    - ``"smooth"``: sigmoid(x / tau) (Smooth-AP);
    - ``"sup"``: the exact step (no gradient) when j and l are both relevant; otherwise sigmoid(x / tau) for
      x <= 0, start + sigmoid(x / tau) for 0 < x <= delta and rho * x + offset beyond (ROADMAP's SupAP);
    - ``"exact"``: the Heaviside step with H(0) = 1, no gradient (the true AP, for monitoring).

    Args:
        similarity: (N, N) similarities of the batch with itself.
        relevance: (N, N) bool, True where items share the query's label (diagonal included).
        rank: the rank approximation.
        tau: sigmoid temperature.
        rho: slope of SupAP's linear upper bound beyond ``delta``.
        delta: where SupAP switches from the shifted sigmoid to the linear bound.
        offset: intercept of the linear bound.
        start: shift of the sigmoid on (0, delta].
        rank_query_itself: rank each query among its own list, where it counts as its own relevant top item.
            The reference implementations do this and the published baselines depend on it; by default the
            query is left out of its list, as AP is defined.

    Returns:
        (N,) AP per query; NaN for a query with no relevant item in its list.
    """
    check_choice(rank, "rank", RankApproximation)
    check_number(tau, "tau", low=0.0, low_open=True)  # tau = 0: a 0/0 step, every AP undefined
    n = similarity.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    in_list = torch.ones_like(eye) if rank_query_itself else ~eye
    chunk = max(1, _CHUNK_ELEMENTS // (n * n))
    aps = []
    for i in range(0, n, chunk):
        s, items = similarity[i : i + chunk], in_list[i : i + chunk]
        relevant = relevance[i : i + chunk] & items
        diff = s[:, None, :] - s[:, :, None]  # [q, j, l] = S_ql - S_qj
        if rank == "exact":
            h = (diff >= 0).to(s.dtype)
        else:
            h = _sigmoid(diff, tau)
            if rank == "sup":
                both_relevant = relevant[:, :, None] & relevant[:, None, :]
                bounded = torch.where(diff <= delta, start + h, rho * diff + offset)
                h = torch.where(both_relevant, (diff >= 0).to(s.dtype), torch.where(diff > 0, bounded, h))
        counted = h * (items[:, None, :] & ~eye[None])  # l in the list, l != j
        rank_all = 1.0 + counted.sum(-1)
        rank_relevant = 1.0 + (counted * relevant[:, None, :]).sum(-1)
        ap = (relevant * rank_relevant / rank_all).sum(-1) / relevant.sum(-1)
        aps.append(ap)
    return torch.cat(aps)


def _one_minus_map(ap: Tensor) -> Tensor | None:
    defined = ~torch.isnan(ap)
    return None if not bool(defined.any()) else 1.0 - ap[defined].mean()


class SmoothAPLoss(MetricLoss):
    """``1 - mean AP`` with the sigmoid-smoothed rank of Smooth-AP.

    Args:
        tau: sigmoid temperature, > 0.
        rank_query_itself: reproduce the reference code, which ranks each query in its own list (see
            :func:`ranking_average_precision`).
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.

    The default temperature is the paper's. Preset (:meth:`~objretrieval.losses.MetricLoss.from_preset`):
    ``"liao2023"``, the Smooth-AP baseline of Liao et al. (ICML 2023) as their code computes it (each query
    ranked in its own list).
    """

    supports_ref: ClassVar[bool] = False
    accepts_mined: ClassVar[tuple[type, ...]] = ()
    presets: ClassVar[dict[str, dict[str, Any]]] = {"liao2023": {"tau": 0.01, "rank_query_itself": True}}

    def __init__(
        self,
        tau: float = 0.01,
        rank_query_itself: bool = False,
        *,
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.tau = check_number(tau, "tau", low=0.0, low_open=True)
        self.rank_query_itself = rank_query_itself

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        ap = ranking_average_precision(
            batch.similarity,
            batch.same_label,
            rank="smooth",
            tau=self.tau,
            rank_query_itself=self.rank_query_itself,
        )
        return _one_minus_map(ap)


class ROADMAPLoss(MetricLoss):
    """ROADMAP: ``(1 - lam) (1 - mean SupAP) + lam * contrastive``, the contrastive term calibrating scores.

    ``lam=0`` gives SupAP alone. The defaults train from a random start: SupAP itself pulls the positives
    that the contrastive term's positive margin leaves alone. Preset
    (:meth:`~objretrieval.losses.MetricLoss.from_preset`): ``"liao2023"``, the "Roadmap" baseline of Liao et
    al. (ICML 2023) as their code computes it (``lam`` 0.5, margins 0.9 / 0.6, each query ranked in its own
    list).

    Args:
        lam: weight of the contrastive term, in [0, 1].
        tau: SupAP's sigmoid temperature, > 0 (see :func:`ranking_average_precision` for it and the next
            four).
        rho: slope of the linear upper bound, >= 0.
        delta: start of the linear upper bound, >= 0.
        offset: intercept of the linear upper bound.
        start: shift of the sigmoid on (0, delta], >= 0.
        pos_margin: similarity positive pairs should exceed (contrastive term), in [-1, 1].
        neg_margin: similarity negative pairs should stay below (contrastive term), in [-1, 1].
        rank_query_itself: reproduce the reference code's ranking of each query in its own list.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix.
    """

    supports_ref: ClassVar[bool] = False
    accepts_mined: ClassVar[tuple[type, ...]] = ()
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "liao2023": {"lam": 0.5, "pos_margin": 0.9, "neg_margin": 0.6, "rank_query_itself": True}
    }
    # SupAP's arguments live in one dict, passed as a whole
    config_attributes: ClassVar[dict[str, str | None]] = {
        name: f"sup.{name}" for name in ("tau", "rho", "delta", "offset", "start")
    }

    def __init__(
        self,
        lam: float = 0.5,
        tau: float = 0.01,
        rho: float = 100.0,
        delta: float = 0.05,
        offset: float = 1.44,
        start: float = 0.5,
        pos_margin: float = 0.9,
        neg_margin: float = 0.6,
        rank_query_itself: bool = False,
        *,
        label_comparison: LabelComparison | None = None,
    ) -> None:
        super().__init__(label_comparison=label_comparison)
        self.lam = check_number(lam, "lam", low=0.0, high=1.0)
        self.sup = dict(
            tau=check_number(tau, "tau", low=0.0, low_open=True),
            rho=check_number(rho, "rho", low=0.0),
            delta=check_number(delta, "delta", low=0.0),
            offset=check_number(offset, "offset"),
            start=check_number(start, "start", low=0.0),
        )
        self.pos_margin = check_number(pos_margin, "pos_margin", low=-1.0, high=1.0)
        self.neg_margin = check_number(neg_margin, "neg_margin", low=-1.0, high=1.0)
        self.rank_query_itself = rank_query_itself

    def compute_parts(self, batch: PairBatch) -> dict[str, Tensor | None]:
        """The unweighted terms ``supap`` (1 - mean SupAP) and ``contrastive``."""
        ap = ranking_average_precision(
            batch.similarity,
            batch.same_label,
            rank="sup",
            rank_query_itself=self.rank_query_itself,
            **self.sup,
        )
        contrastive = margin_contrastive(
            batch.similarity, batch.positive_mask, batch.negative_mask, self.pos_margin, self.neg_margin
        )
        return {"supap": _one_minus_map(ap), "contrastive": contrastive}

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        terms = self.compute_parts(batch)
        self.record_parts(terms)
        if terms["supap"] is None or terms["contrastive"] is None:
            return None
        return (1.0 - self.lam) * terms["supap"] + self.lam * terms["contrastive"]
