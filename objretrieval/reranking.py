"""Rerank a global kNN shortlist with a pairwise model and fuse the scores.

The pipeline of AMES (Suma et al., ECCV 2024), usable with any pairwise scorer:

1. a global descriptor shortlists the K nearest database images of each query (:func:`objretrieval.search.knn`);
2. a pairwise model scores the query against the top ``k`` of them (``raw`` logits);
3. ``lamb * global + (1 - lamb) * sigmoid(temp * raw)`` re-sorts those k; the rest keeps the global order;
4. the final ranking is evaluated, for revisited Oxford/Paris with the official junk handling, over a grid of
   (k, lamb, temp), reporting the best combination (the official code reports the last one).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from objretrieval._validation import to_tensor
from objretrieval.descriptors.store import BinaryCodeStore, DescriptorStore, PathLike
from objretrieval.metrics.revisited import RevisitedResult, revisited_map
from objretrieval.models.ames import AMES, AMES_FUSION, ProjectedDescriptors

#: A pairwise scorer: ``scorer(query_index, database_ids) -> (len(database_ids),)`` raw logits.
Scorer = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class Shortlist:
    """The global kNN shortlist of each query, best first.

    Attributes:
        scores: (Q, K) float global similarities, descending along each row.
        indices: (Q, K) int64 database ids.
    """

    scores: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        if self.scores.shape != self.indices.shape or self.scores.ndim != 2:
            raise ValueError(
                f"scores and indices must both be (Q, K), got {tuple(self.scores.shape)} and "
                f"{tuple(self.indices.shape)}"
            )

    @classmethod
    def from_official(cls, cache_nn: Any) -> Shortlist:
        """From AMES's ``nn_superglobal.pkl`` layout: (2, Q, K), similarities then ids stored as floats."""
        t = to_tensor(cache_nn, "cache_nn")
        if t.ndim != 3 or t.shape[0] != 2:
            raise ValueError(f"cache_nn must be (2, num_queries, K), got {tuple(t.shape)}")
        return cls(t[0].float(), t[1].round().long())

    def move_to_end(self, ids: Sequence[Sequence[int]]) -> Shortlist:
        """Move each query's listed database ids to the end of its shortlist, keeping relative order.

        This is how AMES (after DELG) excludes junk images from reranking: junk for the Medium protocol,
        junk and easy images for Hard.
        """
        if len(ids) != self.indices.shape[0]:
            raise ValueError(
                f"got id lists for {len(ids)} queries, the shortlist has {self.indices.shape[0]}"
            )
        order = []
        indices = self.indices.cpu().numpy()
        for row, listed in zip(indices, ids, strict=True):
            moved = np.isin(row, np.asarray(listed, dtype=np.int64))
            order.append(np.concatenate([np.flatnonzero(~moved), np.flatnonzero(moved)]))
        perm = torch.from_numpy(np.stack(order)).to(self.indices.device)
        return Shortlist(self.scores.gather(1, perm), self.indices.gather(1, perm))


def score_shortlist(scorer: Scorer, shortlist: Shortlist, k: int) -> Tensor:
    """(Q, k) raw pairwise scores of each query against its first k shortlisted images."""
    if not 1 <= k <= shortlist.indices.shape[1]:
        raise ValueError(f"k must be in [1, {shortlist.indices.shape[1]}] (the shortlist length), got {k}")
    rows = [
        torch.as_tensor(scorer(q, shortlist.indices[q, :k])).reshape(-1).float().cpu()
        for q in range(shortlist.indices.shape[0])
    ]
    return torch.stack(rows)


def fuse(global_scores: Tensor, raw: Tensor, lamb: float, temp: float) -> Tensor:
    """``lamb * global + (1 - lamb) * sigmoid(temp * raw)``, elementwise."""
    return lamb * global_scores + (1.0 - lamb) * torch.sigmoid(temp * raw)


def rerank(shortlist: Shortlist, raw: Tensor, k: int, lamb: float, temp: float) -> Tensor:
    """(Q, K) ranking: the first k shortlisted images re-sorted by fused score, the rest in global order.

    Args:
        shortlist: the global shortlist.
        raw: (Q, >= k) pairwise scores along the shortlist.
        k: how many to rerank.
        lamb: weight of the global similarity.
        temp: sigmoid temperature of the pairwise logits.
    """
    if raw.shape[0] != shortlist.indices.shape[0] or raw.shape[1] < k:
        raise ValueError(
            f"raw must be (Q, >= {k}) with Q = {shortlist.indices.shape[0]}, got {tuple(raw.shape)}"
        )
    fused = fuse(shortlist.scores[:, :k].float(), raw[:, :k].float(), lamb, temp)
    order = fused.argsort(dim=1, descending=True, stable=True)  # ties keep the global order
    ranking = shortlist.indices.clone()
    ranking[:, :k] = shortlist.indices[:, :k].gather(1, order)
    return ranking


@dataclass(frozen=True)
class Combination:
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
    rankings: Mapping[str, Tensor] = field(repr=False)

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


@dataclass(frozen=True)
class RevisitedReranking:
    """Results of :func:`rerank_revisited`: every combination, the best one, and the raw scores per run."""

    combinations: list[Combination]
    raw: Mapping[str, Tensor] = field(repr=False)

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
        return "\n".join(lines)


def rerank_revisited(
    scorer: Scorer,
    shortlist: Shortlist,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    *,
    top_k: Iterable[int] = (100,),
    lamb: Iterable[float] | None = None,
    temp: Iterable[float] | None = None,
    kappas: Sequence[int] = (1, 5, 10),
) -> RevisitedReranking:
    """Rerank and evaluate on revisited Oxford/Paris over a grid of (k, lamb, temp).

    Two runs, as the official evaluation: for Medium the query's junk images are moved to the end of the
    shortlist before reranking, for Hard its junk and easy images; each run is scored once up to the largest
    k and every combination re-fuses those scores.

    Args:
        scorer: ``scorer(query_index, database_ids)`` -> raw pairwise logits.
        shortlist: the global shortlist (Q, K).
        gnd: per query the ``easy``, ``hard`` and ``junk`` id lists.
        top_k: numbers of shortlisted images to rerank.
        lamb: weights of the global similarity; default the scorer's model's ``fusion`` (the authors' value
            for each AMES builder), else 0.5.
        temp: sigmoid temperatures of the pairwise logits; default as ``lamb``.
        kappas: depths of mean precision@k.
    """
    if len(gnd) != shortlist.indices.shape[0]:
        raise ValueError(f"gnd has {len(gnd)} queries but the shortlist has {shortlist.indices.shape[0]}")
    fusion = getattr(getattr(scorer, "model", None), "fusion", (0.5, 0.5))
    ks = list(top_k)
    lambs = [fusion[0]] if lamb is None else list(lamb)
    temps = [fusion[1]] if temp is None else list(temp)
    max_k = max(ks)
    excluded = {
        "medium": [list(g["junk"]) for g in gnd],
        "hard": [list(g["junk"]) + list(g["easy"]) for g in gnd],
    }
    runs = {mode: shortlist.move_to_end(ids) for mode, ids in excluded.items()}
    raw = {mode: score_shortlist(scorer, run, max_k) for mode, run in runs.items()}
    combinations = []
    for k, lam, t in itertools.product(ks, lambs, temps):
        rankings = {mode: rerank(runs[mode], raw[mode], k, lam, t) for mode in runs}
        results = {mode: revisited_map(r, gnd, kappas) for mode, r in rankings.items()}
        combinations.append(Combination(k, lam, t, results["medium"], results["hard"], rankings))
    return RevisitedReranking(combinations, raw)


@dataclass(frozen=True)
class DatabaseCache:
    """Every database image projected once for AMES: float16 tokens, or packed codes for binarized models.

    Attributes:
        keep: (N, T) bool, True for real descriptors.
        tokens: (N, T, d) float16 tokens (full-precision models; the official evaluation rounds database
            tokens to float16, so nothing is lost).
        codes: (N, T, bits / 8) uint8 packed codes (binarized models).
    """

    keep: Tensor
    tokens: Tensor | None = None
    codes: Tensor | None = None

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: AMES,
        database: DescriptorStore | tuple[Tensor, Tensor],
        *,
        max_descriptors: int = 50,
        block_size: int = 1024,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> DatabaseCache:
        """Project a database streamed in blocks from a :class:`DescriptorStore` or (descriptors, padding)."""
        model.eval()
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if isinstance(database, DescriptorStore):
            blocks: Iterable[tuple[int, Tensor, Tensor]] = database.blocks(block_size, max_descriptors)
            total = len(database)
        else:
            descriptors, padding = database
            descriptors, padding = descriptors[:, :max_descriptors], padding[:, :max_descriptors]
            total = descriptors.shape[0]
            blocks = (
                (i, descriptors[i : i + block_size], padding[i : i + block_size])
                for i in range(0, total, block_size)
            )
        keeps, parts = [], []
        for _, local, pad in tqdm(
            blocks, total=-(-total // block_size), disable=not progress, desc="projecting"
        ):
            local, pad = local.to(device, torch.float32), pad.to(device)
            if model.binarized:
                codes, keep = model.binary_codes(local, pad)
                parts.append(codes.cpu())
            else:
                projected = model.project_database(local, pad)
                parts.append(projected.tokens.cpu())
                keep = projected.keep
            keeps.append(keep.cpu())
        stacked = torch.cat(parts)
        return (
            cls(torch.cat(keeps), codes=stacked) if model.binarized else cls(torch.cat(keeps), tokens=stacked)
        )

    @classmethod
    def from_code_store(cls, store: BinaryCodeStore) -> DatabaseCache:
        """Load every packed code of a :class:`BinaryCodeStore` (800 bytes per image at 50 x 128 bits)."""
        codes, padding = store.read(np.arange(len(store)))
        return cls(~padding, codes=codes)

    def save_codes(self, path: PathLike) -> None:
        """Write the packed codes of a binarized model's cache to a :class:`BinaryCodeStore` file."""
        if self.codes is None:
            raise ValueError("save_codes needs a cache built with a binarized model (packed codes)")
        with BinaryCodeStore.create(path, len(self), self.codes.shape[1], 8 * self.codes.shape[2]) as store:
            store.write(0, self.codes, ~self.keep)

    def __len__(self) -> int:
        return self.keep.shape[0]

    @property
    def bytes_per_image(self) -> int:
        """Bytes of one image's tokens or codes (the padding mask aside)."""
        data = self.codes if self.codes is not None else self.tokens
        assert data is not None
        return int(data[0].numel() * data.element_size())

    def gather(self, model: AMES, ids: Tensor, device: torch.device) -> ProjectedDescriptors:
        keep = self.keep[ids].to(device)
        if self.codes is not None:
            return model.project_codes(self.codes[ids].to(device), keep)
        assert self.tokens is not None
        return ProjectedDescriptors(self.tokens[ids].to(device), keep)


class AMESScorer:
    """Scores queries against database images with AMES, for :func:`rerank_revisited` or :func:`score_shortlist`.

    Each query is projected once and scored against its candidates ``batch_size`` at a time in one call, from
    a :class:`DatabaseCache` (database projected once) or straight from a descriptor store. On CUDA the
    model runs under autocast.

    Args:
        model: an :class:`~objretrieval.models.AMES`.
        queries: a :class:`DescriptorStore` of query descriptors, or (descriptors (Q, Tq, Dl), padding (Q, Tq)).
        database: a :class:`DatabaseCache`; a :class:`DescriptorStore` or (descriptors, padding) tensors,
            projected as candidates come; or a :class:`BinaryCodeStore` of packed codes (binarized models),
            read as candidates come.
        query_descriptors: descriptors per query (600 in the paper).
        database_descriptors: descriptors per database image (50), when not cached.
        batch_size: candidates scored per call (memory grows with it; on a CPU 16 is already as fast as more).
        device: where to run; default the model's device.
        autocast: run under autocast with ``amp_dtype``. ``None`` (default): on CUDA only; ``True``: on any
            device (on CPUs with bfloat16 support use ``amp_dtype=torch.bfloat16``); ``False``: never, and an
            enclosing autocast region is left in effect.
        amp_dtype: the autocast dtype, ``torch.float16`` or ``torch.bfloat16``.
    """

    def __init__(
        self,
        model: AMES,
        queries: DescriptorStore | tuple[Tensor, Tensor],
        database: DatabaseCache | DescriptorStore | BinaryCodeStore | tuple[Tensor, Tensor],
        *,
        query_descriptors: int = 600,
        database_descriptors: int = 50,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        autocast: bool | None = None,
        amp_dtype: torch.dtype = torch.float16,
    ) -> None:
        if amp_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be torch.float16 or torch.bfloat16, got {amp_dtype}")
        if isinstance(database, BinaryCodeStore) and not model.binarized:
            raise ValueError("a BinaryCodeStore database needs a binarized model (the *_dist builders)")
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.queries, self.database = queries, database
        self.query_descriptors, self.database_descriptors = query_descriptors, database_descriptors
        self.batch_size = batch_size
        self.autocast = self.device.type == "cuda" if autocast is None else autocast
        self.amp_dtype = amp_dtype
        self._query: tuple[int, ProjectedDescriptors] | None = None

    def _read(
        self, source: DescriptorStore | tuple[Tensor, Tensor], ids: Tensor, limit: int
    ) -> tuple[Tensor, Tensor]:
        if isinstance(source, DescriptorStore):
            return source.read(ids.cpu().numpy(), limit)
        descriptors, padding = source
        return descriptors[ids.cpu(), :limit], padding[ids.cpu(), :limit]

    def _project_query(self, q: int) -> ProjectedDescriptors:
        if self._query is None or self._query[0] != q:  # consecutive calls for one query reuse its projection
            local, pad = self._read(self.queries, torch.tensor([q]), self.query_descriptors)
            self._query = (
                q,
                self.model.project_query(local.to(self.device, torch.float32), pad.to(self.device)),
            )
        return self._query[1]

    def _database(self, ids: Tensor) -> ProjectedDescriptors:
        if isinstance(self.database, DatabaseCache):
            return self.database.gather(self.model, ids, self.device)
        if isinstance(self.database, BinaryCodeStore):
            codes, padding = self.database.read(ids.cpu().numpy())
            return self.model.project_codes(codes.to(self.device), ~padding.to(self.device))
        local, pad = self._read(self.database, ids, self.database_descriptors)
        projected = self.model.project_database(local.to(self.device, torch.float32), pad.to(self.device))
        return projected

    @torch.no_grad()
    def __call__(self, q: int, ids: Tensor) -> Tensor:
        """(len(ids),) logits of query ``q`` against database images ``ids`` (a 1-D integer tensor)."""
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(
                f"ids must be a 1-D integer tensor of database ids, got {ids.dtype} {tuple(ids.shape)}"
            )
        amp = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.autocast
            else contextlib.nullcontext()
        )
        with amp:
            query = self._project_query(q)
            scores = [
                self.model.score(query, self._database(ids[i : i + self.batch_size]))
                for i in range(0, len(ids), self.batch_size)
            ]
        return torch.cat(scores).float().cpu()


def score_table(scores: Any) -> Scorer:
    """A scorer reading a precomputed (Q, N) table of pairwise scores."""
    table = to_tensor(scores, "scores")
    return lambda q, ids: table[q, ids.to(table.device)]


__all__ = [
    "AMES_FUSION",
    "AMESScorer",
    "Combination",
    "DatabaseCache",
    "RevisitedReranking",
    "Scorer",
    "Shortlist",
    "fuse",
    "rerank",
    "rerank_revisited",
    "score_shortlist",
    "score_table",
]
