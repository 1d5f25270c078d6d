"""Landmark-retrieval protocols: revisited Oxford/Paris (Radenović et al. 2018) and GLDv2 mAP@100.

Rankings here are (Q, K) gallery ids, best first, one row per query (the official code stores the transpose).
Junk items are removed from the ranking before scoring: each relevant item's position drops by the number of
junk items ranked above it, exactly as ``revisitop``'s ``compute_map`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from objretrieval._validation import check_choice, check_positive_int, check_ranking
from objretrieval.display import SummaryRepr, gldv2_result_html, revisited_result_html
from objretrieval.metrics.ranks import RelevantRanks, left_align
from objretrieval.metrics.retrieval import average_precision, trapezoidal_average_precision

APKind = Literal["trapezoidal", "rectangular"]

#: Ground-truth lists that count as relevant / junk under each revisited protocol.
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


@dataclass(frozen=True, repr=False)
class ProtocolResult(SummaryRepr):
    """mAP and mean precision@k over the queries that have relevant items (fractions, not percent).

    Attributes:
        map: mean AP over queries with at least one relevant item.
        ap: (Q,) float64 AP per query, NaN where the query has no relevant item (left out of the mean).
        mean_precision: (len(kappas),) mean precision@k, same queries as ``map``.
        precision: (Q, len(kappas)) precision@k per query, NaN where undefined.
        kappas: the k of each precision column.
    """

    map: float
    ap: Tensor
    mean_precision: Tensor
    precision: Tensor
    kappas: tuple[int, ...]

    def summary_fields(self) -> dict[str, Any]:
        """The means (a few numbers) in full, the per-query values as a count."""
        return {
            "map": self.map,
            "mean_precision": self.mean_precision.tolist(),
            "kappas": self.kappas,
            "queries": self.ap.shape[0],
        }


@dataclass(frozen=True, repr=False)
class RevisitedResult(SummaryRepr):
    """Results of the Easy, Medium and Hard protocols of revisited Oxford/Paris."""

    easy: ProtocolResult
    medium: ProtocolResult
    hard: ProtocolResult

    def summary(self) -> dict[str, Any]:
        """The official ``compute_metrics`` dictionary: percentages rounded to 3 decimals."""
        out: dict[str, Any] = {}
        for key, res in (("E", self.easy), ("M", self.medium), ("H", self.hard)):
            out[f"{key}_map"] = float(np.around(res.map * 100, decimals=3))
            out[f"{key}_mp"] = np.around(res.mean_precision.numpy() * 100, decimals=3).tolist()
        return out

    def _repr_html_(self) -> str:
        """The table Jupyter shows (see :func:`objretrieval.display.revisited_result_html`)."""
        return revisited_result_html(self)


@dataclass(frozen=True, repr=False)
class GLDv2Result(SummaryRepr):
    """GLDv2 mAP@depth; ``public``/``private`` when the split was given."""

    map: float
    ap: Tensor
    public: float | None = None
    private: float | None = None

    def _repr_html_(self) -> str:
        """The table Jupyter shows (see :func:`objretrieval.display.gldv2_result_html`)."""
        return gldv2_result_html(self)


def _as_ranking(ranking: Any) -> Tensor:
    r = check_ranking(ranking, "ranking")
    if r.numel() and int(r.min()) < 0:
        raise ValueError(f"ranking holds negative ids (min {int(r.min())}); gallery ids start at 0")
    return r


def _check_lists(lists: Sequence[Sequence[int]] | None, name: str, num_queries: int) -> None:
    if lists is not None and len(lists) != num_queries:
        raise ValueError(f"{name} has {len(lists)} entries but the ranking has {num_queries} queries")


def junk_adjusted_ranks(
    ranking: Any, positives: Sequence[Sequence[int]], junk: Sequence[Sequence[int]] | None = None
) -> RelevantRanks:
    """Ranks of each query's relevant items after removing its junk items from the ranking.

    Args:
        ranking: (Q, K) gallery ids, best first.
        positives: per query, the relevant gallery ids.
        junk: per query, gallery ids to ignore (neither relevant nor irrelevant).
    """
    r = _as_ranking(ranking)
    _check_lists(positives, "positives", r.shape[0])
    _check_lists(junk, "junk", r.shape[0])
    rows = r.numpy()
    found: list[np.ndarray] = []
    for q, row in enumerate(rows):
        pos = np.flatnonzero(np.isin(row, np.asarray(positives[q], dtype=np.int64)))
        if junk is not None and len(junk[q]):
            junk_pos = np.flatnonzero(np.isin(row, np.asarray(junk[q], dtype=np.int64)))
            pos = pos - np.searchsorted(junk_pos, pos)  # junk items ranked strictly above each positive
        found.append(pos + 1)
    width = max([len(f) for f in found] + [1])
    ranks = torch.zeros((r.shape[0], width), dtype=torch.int64)
    for q, f in enumerate(found):
        ranks[q, : len(f)] = torch.from_numpy(f)
    num_relevant = torch.tensor([len(p) for p in positives], dtype=torch.int64)
    return RelevantRanks(left_align(ranks), num_relevant, r.shape[1])


def _revisited_precision(ranks: RelevantRanks, kappas: Sequence[int]) -> Tensor:
    """(Q, len(kappas)) the protocol's precision@k: k is capped at the deepest relevant item found."""
    num_found = ranks.found.sum(dim=1)
    deepest = ranks.ranks.gather(1, (num_found - 1).clamp(min=0)[:, None]).squeeze(1)
    columns = []
    for k in kappas:
        kq = deepest.clamp(max=k).clamp(min=1)
        hits = (ranks.found & (ranks.ranks <= kq[:, None])).sum(dim=1)
        columns.append(torch.where(num_found > 0, hits.double() / kq.double(), 0.0))
    precision = (
        torch.stack(columns, dim=1) if columns else torch.zeros((ranks.num_queries, 0), dtype=torch.float64)
    )
    return torch.where((ranks.num_relevant > 0)[:, None], precision, float("nan"))


def mean_average_precision(
    ranking: Any,
    positives: Sequence[Sequence[int]],
    junk: Sequence[Sequence[int]] | None = None,
    *,
    kappas: Sequence[int] = (),
    kind: APKind = "trapezoidal",
) -> ProtocolResult:
    """mAP and precision@k with junk removal, as ``revisitop``'s ``compute_map``.

    Args:
        ranking: (Q, K) gallery ids, best first.
        positives: per query, the relevant gallery ids. Queries without any are left out of the means.
        junk: per query, ids removed from the ranking before scoring.
        kappas: depths for precision@k.
        kind: ``"trapezoidal"`` (revisited Oxford/Paris) or ``"rectangular"`` (GLDv2) AP.
    """
    check_choice(kind, "kind", APKind)
    kappas = _check_kappas(kappas)
    ranks = junk_adjusted_ranks(ranking, positives, junk)
    ap = (trapezoidal_average_precision if kind == "trapezoidal" else average_precision)(ranks)
    precision = _revisited_precision(ranks, kappas)
    valid = ranks.num_relevant > 0
    n_valid = int(valid.sum())
    mean_ap = float(ap[valid].mean()) if n_valid else float("nan")
    mean_precision = precision[valid].mean(dim=0) if n_valid else torch.full((len(kappas),), float("nan"))
    return ProtocolResult(mean_ap, ap, mean_precision.double(), precision, kappas)


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    if isinstance(kappas, (np.ndarray, Tensor)):
        kappas = kappas.tolist()
    if isinstance(kappas, (str, bytes)) or not isinstance(kappas, Sequence):
        raise TypeError(f"kappas must be a sequence of ints >= 1, got {type(kappas).__name__}")
    return tuple(check_positive_int(k, f"kappas[{i}]") for i, k in enumerate(kappas))


def _lists(gnd: Sequence[Mapping[str, Sequence[int]]], keys: tuple[str, ...]) -> list[list[int]]:
    out = []
    for q, entry in enumerate(gnd):
        missing = [k for k in keys if k not in entry]
        if missing:
            raise KeyError(
                f"gnd[{q}] lacks {missing}; revisited ground truth needs 'easy', 'hard' and 'junk'"
            )
        out.append([int(i) for k in keys for i in np.asarray(entry[k]).ravel()])
    return out


def revisited_map(
    ranking: Any,
    gnd: Sequence[Mapping[str, Sequence[int]]] | Mapping[str, Any],
    kappas: Sequence[int] = (1, 5, 10),
) -> RevisitedResult:
    """Revisited Oxford/Paris Easy, Medium and Hard mAP and mP@k.

    Easy: relevant = easy, junk = junk + hard. Medium: relevant = easy + hard, junk = junk. Hard: relevant =
    hard, junk = junk + easy. Queries without relevant items under a protocol are left out of its means.

    Args:
        ranking: (Q, K) gallery ids, best first (the transpose of the official ``ranks``).
        gnd: per query a mapping with ``easy``, ``hard`` and ``junk`` id lists, or the official gnd dict
            holding them under ``"gnd"``.
        kappas: depths for mean precision@k.
    """
    entries = gnd["gnd"] if isinstance(gnd, Mapping) else gnd
    results = {
        name: mean_average_precision(ranking, _lists(entries, ok), _lists(entries, junk), kappas=kappas)
        for name, (ok, junk) in PROTOCOLS.items()
    }
    return RevisitedResult(**results)


def gldv2_map(
    ranking: Any,
    positives: Sequence[Sequence[int]],
    *,
    depth: int = 100,
    junk: Sequence[Sequence[int]] | None = None,
    num_private: int | None = None,
) -> GLDv2Result:
    """GLDv2 mAP@depth: rectangular AP over the first ``depth`` results, normalised by min(R, depth).

    Args:
        ranking: (Q, K) gallery ids, best first; only the first ``depth`` columns are used.
        positives: per query, the relevant gallery ids.
        depth: ranking depth (100 for the GLDv2 benchmark).
        junk: optional per-query ids to remove first.
        num_private: if given, the last ``num_private`` queries form the private split (750 for GLDv2-test)
            and the rest the public one.
    """
    depth = check_positive_int(depth, "depth")
    r = _as_ranking(ranking)[:, :depth]
    result = mean_average_precision(r, positives, junk, kind="rectangular")
    if num_private is None:
        return GLDv2Result(result.map, result.ap)
    num_private = check_positive_int(num_private, "num_private")
    if num_private >= r.shape[0]:
        raise ValueError(f"num_private must be in (0, {r.shape[0]}), got {num_private}")
    public, private = result.ap[:-num_private], result.ap[-num_private:]
    return GLDv2Result(result.map, result.ap, float(public.nanmean()), float(private.nanmean()))
