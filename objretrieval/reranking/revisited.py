"""The revisited Oxford/Paris reranking sweep: junk handling, one scoring pass per run, every (k, lamb, temp)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from objretrieval.display import SummaryRepr
from objretrieval.distributed.world import Group
from objretrieval.metrics.revisited import RevisitedResult, revisited_map
from objretrieval.reranking.shortlist import MISSING, Shortlist, ShortlistLike, rerank, score_shortlist
from objretrieval.search.pairwise import PairwiseScorer


@dataclass(frozen=True, repr=False)
class Combination(SummaryRepr):
    """One (k, lamb, temp) setting of the revisited reranking sweep.

    Attributes:
        k: number of shortlisted images reranked.
        lamb: weight of the global similarity.
        temp: sigmoid temperature of the pairwise logits.
        medium: metrics of the ranking built with junk moved out of the shortlist (for Medium).
        hard: metrics of the ranking built with junk and easy images moved out (for Hard).
        rankings: (Q, K) rankings per run, keyed ``"medium"`` and ``"hard"``.
    """

    k: int
    lamb: float
    temp: float
    medium: RevisitedResult
    hard: RevisitedResult
    rankings: Mapping[str, Tensor]

    def summary_fields(self) -> dict[str, Any]:
        """What the repr shows: ``Combination(k=100, lamb=0.55, temp=0.3, medium_map=0.81, hard_map=0.62)``."""
        return {
            "k": self.k,
            "lamb": self.lamb,
            "temp": self.temp,
            "medium_map": self.medium_map,
            "hard_map": self.hard_map,
        }

    @property
    def medium_map(self) -> float:
        return self.medium.medium.map

    @property
    def hard_map(self) -> float:
        return self.hard.hard.map

    @property
    def score(self) -> float:
        """(Medium mAP of the medium run + Hard mAP of the hard run) / 2, the quantity to select by."""
        return (self.medium_map + self.hard_map) / 2


@dataclass(frozen=True, repr=False)
class RevisitedReranking(SummaryRepr):
    """Results of :func:`rerank_revisited`: every combination, the best one, and the raw scores per run.

    Attributes:
        combinations: one per (k, lamb, temp), in grid order.
        raw: (Q, max k) raw scores along each run's shortlist, NaN at missing entries.
        missing: shortlist entries within the largest k that were missing (index -1), not scored, ranked last.
    """

    combinations: list[Combination]
    raw: Mapping[str, Tensor]
    missing: int = 0

    def summary_fields(self) -> dict[str, Any]:
        """What the repr shows: how many combinations, the best one, the missing entries."""
        best = self.best if self.combinations else None
        return {"combinations": len(self.combinations), "best": best, "missing": self.missing}

    @property
    def best(self) -> Combination:
        return max(self.combinations, key=lambda c: c.score)

    def summary(self) -> str:
        lines = [f"{'k':>5} {'lamb':>6} {'temp':>6} {'M mAP':>7} {'H mAP':>7}"]
        for c in self.combinations:
            lines.append(
                f"{c.k:>5} {c.lamb:>6.2f} {c.temp:>6.2f} {100 * c.medium_map:>7.2f} {100 * c.hard_map:>7.2f}"
            )
        b = self.best
        lines.append(
            f"best: k={b.k} lamb={b.lamb} temp={b.temp}: M {100 * b.medium_map:.2f}, H {100 * b.hard_map:.2f}"
        )
        if self.missing:
            lines.append(f"{self.missing} missing shortlist entries (index -1) were not scored and rank last")
        return "\n".join(lines)


def rerank_revisited(
    scorer: PairwiseScorer,
    shortlist: ShortlistLike,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    *,
    top_k: Iterable[int] = (100,),
    lamb: Iterable[float] | None = None,
    temp: Iterable[float] | None = None,
    kappas: Sequence[int] = (1, 5, 10),
    progress: bool | None = None,
    group: Group | None = None,
) -> RevisitedReranking:
    """Rerank and evaluate on revisited Oxford/Paris over a grid of (k, lamb, temp).

    Two runs, as the official evaluation: for Medium the query's junk images are moved to the end of the
    shortlist before reranking, for Hard its junk and easy images; each run is scored once up to the largest
    k and every combination re-fuses those scores.

    Args:
        scorer: a :class:`~objretrieval.search.PairwiseScorer` (raw pairwise logits), e.g. :class:`AMESScorer`.
        shortlist: the global shortlist (Q, K), or a search's ``Neighbors``.
        gnd: per query the ``easy``, ``hard`` and ``junk`` id lists.
        top_k: numbers of shortlisted images to rerank.
        lamb: weights of the global similarity; default the scorer's model's ``fusion`` (the authors' value
            for each AMES builder), else 0.5.
        temp: sigmoid temperatures of the pairwise logits; default as ``lamb``.
        kappas: depths of mean precision@k.
        progress: a bar over the chunks of pairs of each run's scoring; None (the default): only for runs of
            1e5 scored pairs or more (:func:`objretrieval.progress.show_progress`).
        group: share the pairwise scoring over this process group's ranks, as
            :func:`~objretrieval.reranking.score_shortlist` does (every rank gets every result, identical to
            one process's); None scores in this process.
    """
    shortlist = Shortlist.of(shortlist)
    if len(gnd) != shortlist.indices.shape[0]:
        raise ValueError(f"gnd has {len(gnd)} queries but the shortlist has {shortlist.indices.shape[0]}")
    fusion = getattr(getattr(scorer, "model", None), "fusion", (0.5, 0.5))
    ks = list(top_k)
    lambs = [fusion[0]] if lamb is None else list(lamb)
    temps = [fusion[1]] if temp is None else list(temp)
    if not ks or not lambs or not temps:
        raise ValueError("top_k, lamb and temp must each hold at least one value")
    max_k = max(ks)
    excluded = {
        "medium": [list(g["junk"]) for g in gnd],
        "hard": [list(g["junk"]) + list(g["easy"]) for g in gnd],
    }
    runs = {mode: shortlist.move_to_end(ids) for mode, ids in excluded.items()}
    raw = {
        mode: score_shortlist(scorer, run, max_k, progress=progress, group=group)
        for mode, run in runs.items()
    }
    combinations = []
    for k, lam, t in itertools.product(ks, lambs, temps):
        rankings = {mode: rerank(runs[mode], raw[mode], k, lam, t) for mode in runs}
        results = {mode: revisited_map(_evaluable(r, gnd), gnd, kappas) for mode, r in rankings.items()}
        combinations.append(Combination(k, lam, t, results["medium"], results["hard"], rankings))
    return RevisitedReranking(combinations, raw, int(shortlist.missing[:, :max_k].sum()))


def _evaluable(ranking: Tensor, gnd: Sequence[Mapping[str, Sequence[int]]]) -> Tensor:
    """Missing entries (-1, always last in a row) as an id no ground-truth list holds.

    The metrics take database ids only; an id that is neither relevant nor junk, behind every real entry,
    retrieves nothing, which is what a missing entry does.
    """
    missing = ranking == MISSING
    if not bool(missing.any()):
        return ranking
    listed = [max(g[key]) for g in gnd for key in ("easy", "hard", "junk") if len(g[key])]
    return ranking.masked_fill(missing, max([int(ranking.max()), *listed]) + 1)
