"""Retrieval metrics as an ``nn.Module`` that accumulates batches: the torchmetrics protocol, across processes.

:class:`RetrievalMetrics` stores the embeddings, labels and (optionally) dataset indices of every
:meth:`~RetrievalMetrics.update` and evaluates them all at :meth:`~RetrievalMetrics.compute` with the engine of
:class:`~objretrieval.metrics.RetrievalEvaluator`, so the values are those of the evaluator on the same data.

Under ``torch.distributed`` each rank keeps only its own shard. ``compute()`` exchanges only labels and
indices (O(N) integers), removes duplicates globally, runs the sharded exact kNN of
:func:`objretrieval.distributed.knn.sharded_knn` (no rank ever holds the whole gallery; ``map`` and ``mrr``
use a sharded exact count of every relevant item's rank instead) and gathers the per-query values (O(Q)
floats), which are reduced in the global order: every rank gets the values one process computes on the
concatenated, deduplicated data ordered by index.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from objretrieval._validation import check_choice, check_embeddings, check_label_rows, check_labels, to_tensor
from objretrieval.display import ConfigRepr

# The re-sharding that makes sharded scores bit-identical to one process's, shared with the sharded kNN.
from objretrieval.distributed.knn import sharded_knn
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    rank,
    shard_offsets,
    world_size,
)
from objretrieval.metrics.evaluator import Average, RetrievalEvaluator, RetrievalResult
from objretrieval.metrics.ranks import LabelComparison, Relevance, RelevantRanks
from objretrieval.metrics.registry import NeighborLists
from objretrieval.metrics.retrieval import NoRelevantPolicy
from objretrieval.metrics.sharded_ranks import GlobalShard, sharded_relevant_ranks
from objretrieval.search import Metric
from objretrieval.search.exact import Precision, SearchStats

#: What the rows of one :meth:`RetrievalMetrics.update` are: ``"both"`` queries and gallery at once
#: (leave-one-out, each item's own row excluded), or the query or gallery side of a query/gallery evaluation.
Role = Literal["both", "query", "gallery"]
_ROLES: tuple[Role, ...] = ("both", "query", "gallery")
_WHAT = {"both": "item", "query": "query", "gallery": "gallery item"}
_STORAGE_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Query rows per block of the evaluator's kNN (``knn``'s default); the sharded kNN reproduces one process's
#: scores only for the same blocks.
_KNN_QUERY_BLOCK = 4096
#: Where the reprs of :class:`RetrievalMetrics` and its torchmetrics adapter read the arguments they pass on
#: to their evaluator: from it (:class:`~objretrieval.display.ConfigRepr`).
ENGINE_ARGUMENTS: dict[str, str | None] = {
    name: f"evaluator.{RetrievalEvaluator.config_attributes.get(name) or name}"
    for name in inspect.signature(RetrievalEvaluator).parameters
}


@dataclass
class Rows:
    """One role's rows, concatenated: (N, D) embeddings, (N,) or (N, L) labels, (N,) indices or None."""

    embeddings: Tensor
    labels: Tensor
    indices: Tensor | None


@dataclass
class _Store:
    """The updates of one role as lists of per-update tensors, concatenated only when needed."""

    embeddings: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    indices: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(t.shape[0] for t in self.labels)

    def append(self, rows: Rows) -> None:
        self.embeddings.append(rows.embeddings)
        self.labels.append(rows.labels)
        if rows.indices is not None:
            self.indices.append(rows.indices)

    def rows(self) -> Rows | None:
        if not self.labels:
            return None
        indices = torch.cat(self.indices) if self.indices else None
        return Rows(torch.cat(self.embeddings), torch.cat(self.labels), indices)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.embeddings = [fn(t) for t in self.embeddings]
        self.labels = [fn(t) for t in self.labels]
        self.indices = [fn(t) for t in self.indices]


def build_engine(
    metrics: Sequence[str], *, storage_dtype: torch.dtype | None = None, **options: Any
) -> tuple[RetrievalEvaluator, torch.dtype | None]:
    """The evaluator that computes the metrics (``options``: its arguments) and the checked storage dtype:
    the one construction :class:`RetrievalMetrics` and its torchmetrics adapter share."""
    if storage_dtype not in _STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(_STORAGE_DTYPES)}, got {storage_dtype!r}")
    return RetrievalEvaluator(metrics, **options), storage_dtype


def check_update(
    embeddings: Any, labels: Any, indices: Any, role: Any, label_rows: bool
) -> tuple[Tensor, Tensor, Tensor | None, Role]:
    """The validated arguments of an ``update``: (N, D) finite embeddings, N labels, N indices >= 0 or None.

    Args:
        label_rows: labels may be (N, L) (a custom ``label_comparison_fn`` reads them).
    """
    role = check_choice(role, "role", Role)
    x = check_embeddings(embeddings, "embeddings")
    check = check_label_rows if label_rows else check_labels
    y = check(labels, "labels", x.shape[0], "embeddings")
    if indices is None:
        return x, y, None, role
    idx = to_tensor(indices, "indices")
    if idx.dtype not in _INT_DTYPES:
        raise TypeError(f"indices must be integer dataset indices in [0, 2**63), got dtype {idx.dtype}")
    if tuple(idx.shape) != (x.shape[0],):
        raise ValueError(
            f"indices must have shape ({x.shape[0]},), one per row of embeddings, got {tuple(idx.shape)}"
        )
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"indices must be dataset indices >= 0, got {int(idx.min())}")
    return x, y, idx.to(torch.int64), role


def check_same_layout(
    embeddings: Tensor, labels: Tensor, first_embeddings: Tensor, first_labels: Tensor
) -> None:
    """Refuse a batch that cannot be concatenated with the stored ones: another embedding dim or dtype, or
    label rows of another shape than the first stored batch's."""
    x, y = first_embeddings, first_labels
    if embeddings.shape[1] != x.shape[1] or embeddings.dtype != x.dtype:
        raise ValueError(
            f"embeddings have dim {embeddings.shape[1]} and dtype {embeddings.dtype}, but earlier updates had "
            f"dim {x.shape[1]} and dtype {x.dtype} (set storage_dtype to store every batch in one dtype)"
        )
    if labels.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"labels rows have shape {tuple(labels.shape[1:])}, but earlier updates had {tuple(y.shape[1:])}"
        )


def first_occurrences(labels: Tensor, indices: Tensor | None, what: str) -> Tensor:
    """Positions of the rows to keep, in the order of evaluation.

    Without indices: every row, in arrival order. With indices: the first row of each distinct index (rows
    come in arrival order, rank-major across processes), ordered by index. A repeated index must repeat its
    label; its embedding is not compared, as recomputing a sample in another batch may round differently.
    """
    if indices is None:
        return torch.arange(labels.shape[0], device=labels.device)
    ordered, order = torch.sort(indices, stable=True)  # stable: the earliest row of an index comes first
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = order[first]
    sorted_labels = labels[order]
    kept_labels = sorted_labels[first][torch.cumsum(first, 0) - 1]
    differ = sorted_labels != kept_labels
    if differ.ndim > 1:
        differ = differ.any(dim=1)
    if bool(differ.any()):
        at = int(differ.nonzero()[0, 0])
        raise ValueError(
            f"{what} index {int(ordered[at])} was given twice with different labels "
            f"({kept_labels[at].tolist()} and {sorted_labels[at].tolist()}); a dataset index names one sample"
        )
    return keep


def evaluate_rows(evaluator: RetrievalEvaluator, data: dict[Role, Rows]) -> RetrievalResult:
    """The evaluator on accumulated rows, after removing duplicates: ``{"both": rows}`` (leave-one-out) or
    ``{"query": rows, "gallery": rows}``. Labels are evaluated on the CPU, where the search results land."""
    kept = {}
    for role, rows in data.items():
        if rows.indices is None:  # every row, as it came: no copy
            kept[role] = (rows.embeddings, rows.labels.cpu())
            continue
        keep = first_occurrences(rows.labels, rows.indices, _WHAT[role])
        kept[role] = (rows.embeddings[keep], rows.labels[keep].cpu())
    if "both" in kept:
        return evaluator(*kept["both"])
    return evaluator(*kept["query"], *kept["gallery"])


class RetrievalMetrics(ConfigRepr, nn.Module):
    """Retrieval metrics accumulated over batches: ``update`` per batch, ``compute`` once, ``reset`` after.

    The metric names and arguments are those of :class:`~objretrieval.metrics.RetrievalEvaluator`, and
    :meth:`compute` returns what the evaluator returns on all rows seen since the last :meth:`reset`. Each
    ``update`` gives a batch of items of one role: ``"both"`` (leave-one-out: every item is a query and a
    gallery item, its own row excluded) or ``"query"`` / ``"gallery"`` (query/gallery mode); the two modes do
    not mix.

    Duplicates: an item seen twice (a ``DistributedSampler`` pads its last batch by repeating samples) is
    counted once when ``indices`` (dataset indices) are given: the first occurrence is kept (lowest rank, then
    earliest update), its label must agree with every repeat, and the items are evaluated in index order, so
    ties rank the lower index first. Without indices every row counts, in arrival order (rank-major across
    processes).

    State: the stored tensors follow the module's device (``.to(device)``; they are stored there as they
    arrive, in ``storage_dtype`` if given, else as given) and are part of ``state_dict()`` as the module's
    extra state (one tensor per role and field), so checkpoints resume an unfinished evaluation (under DDP each
    rank's state is its own shard: restore each rank's, or evaluate before checkpointing). Memory:
    O(N x D) for the stored embeddings (half with a 16-bit ``storage_dtype``), and the search streams them in
    blocks, never forming the N x N score matrix.

    ``forward`` is ``update`` and returns None: torchmetrics' ``forward`` also returns the value on the batch
    alone, but a batch's items retrieving each other measure nothing about the dataset, and computing it
    would cost a search per step.

    Distributed: when ``torch.distributed`` is initialised and ``group`` (default: the default group) has more
    than one process, each rank keeps only its own rows and :meth:`compute` (a collective: call it on every
    rank) evaluates the union of all ranks' rows, returning the single-process values on every rank. The
    kNN metrics use :func:`~objretrieval.distributed.knn.sharded_knn`, bit-identical to one process. ``map``
    and ``mrr`` use a sharded exact count (:func:`sharded_relevant_ranks`), identical to one process except
    where two of a query's scores differ by a last-bit rounding (its score blocks have other shapes; integer
    data is exact). The clustering metrics gather all embeddings to every rank (O(N x D) per rank). Exchanged
    tensors live on the module's device: with nccl, move the module to the GPU. A world of one is the
    single-process computation. In Lightning, ``self.log_dict(metrics.compute().metrics)`` logs every value.

    Args:
        metrics: metric names (:func:`~objretrieval.metrics.list_metrics`).
        metric: similarity for ranking: ``"cosine"``, ``"ip"`` or ``"l2"``.
        no_relevant: policy for queries without relevant items (``"exclude"``, ``"zero"``, ``"error"``).
        average: ``"query"`` or ``"class"`` (PML's ``avg_of_avgs``).
        label_comparison_fn: custom relevance, as for the evaluator (labels may then be (N, L)).
        return_per_query: fill :attr:`RetrievalResult.per_query` (in evaluation order).
        block_size: gallery rows per block of the search.
        device: where to search; default the module's device, where the rows are stored.
        kmeans_seed: seed of the clustering metrics' k-means.
        storage_dtype: keep the stored embeddings in this dtype (e.g. ``torch.float16``); the values are then
            those of the evaluator on the rounded embeddings.
        precision: screening products of the kNN search, ``"float32"`` or ``"bf16-exact"`` (identical values;
            see :class:`~objretrieval.metrics.RetrievalEvaluator`).
        backend: the kNN backend of a single-process ``compute()``: ``"torch"``, or ``"triton"`` (the fused
            kernel, identical values; see :func:`~objretrieval.search.knn`). Across processes the search is
            the sharded torch engine.
        group: the process group to evaluate over; None for the default group.

    Example:
        >>> import torch
        >>> from objretrieval.metrics.streaming import RetrievalMetrics
        >>> m = RetrievalMetrics(["recall@1", "map@r"])
        >>> for _ in range(3):
        ...     m.update(torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> result = m.compute()  # a RetrievalResult over the 24 items
        >>> m.reset()
    """

    _anchor: Tensor
    config_attributes = ENGINE_ARGUMENTS

    def __init__(
        self,
        metrics: Sequence[str] = ("precision@1", "r_precision", "map@r"),
        *,
        metric: Metric = "cosine",
        no_relevant: NoRelevantPolicy = "exclude",
        average: Average = "query",
        label_comparison_fn: LabelComparison | None = None,
        return_per_query: bool = False,
        block_size: int = 4096,
        device: torch.device | str | None = None,
        kmeans_seed: int = 1234,
        storage_dtype: torch.dtype | None = None,
        precision: Precision = "float32",
        backend: Literal["torch", "triton"] = "torch",
        group: Group = None,
    ) -> None:
        super().__init__()
        self._settings: dict[str, Any] = {
            "metrics": metrics,
            "metric": metric,
            "no_relevant": no_relevant,
            "average": average,
            "label_comparison_fn": label_comparison_fn,
            "block_size": block_size,
            "device": device,
            "kmeans_seed": kmeans_seed,
            "storage_dtype": storage_dtype,
            "precision": precision,
            "backend": check_choice(backend, "backend", ("torch", "triton")),
        }
        self.evaluator, self.storage_dtype = build_engine(**self._settings, return_per_query=return_per_query)
        self.group = group
        # An empty buffer that .to() moves: the device the stored rows follow.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self._stores: dict[Role, _Store] = {}
        self.reset()

    # -- the torchmetrics protocol ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every stored row."""
        self._stores = {role: _Store() for role in _ROLES}

    @torch.no_grad()
    def update(self, embeddings: Any, labels: Any, indices: Any = None, *, role: Role = "both") -> None:
        """Store a batch.

        Args:
            embeddings: (B, D) floating, finite.
            labels: (B,) integer labels ((B, L) with a ``label_comparison_fn``).
            indices: optional (B,) dataset indices (integers >= 0) that identify repeated items; give them to
                every update since the last :meth:`reset`, or to none.
            role: ``"both"`` (leave-one-out), ``"query"`` or ``"gallery"``.
        """
        x, y, idx, role = check_update(
            embeddings, labels, indices, role, self.evaluator.label_comparison_fn is not None
        )
        device = self._anchor.device
        rows = Rows(x.detach().to(device=device, dtype=self.storage_dtype or x.dtype), y.to(device), idx)
        if rows.indices is not None:
            rows.indices = rows.indices.to(device)
        self._check_compatible(rows, role)
        self._stores[role].append(rows)

    def forward(self, embeddings: Any, labels: Any, indices: Any = None, *, role: Role = "both") -> None:
        """Same as :meth:`update` (see the class docstring for why no batch value is returned)."""
        self.update(embeddings, labels, indices, role=role)

    @torch.no_grad()
    def compute(self) -> RetrievalResult:
        """Every metric over the rows stored since the last :meth:`reset` (on every rank, when distributed)."""
        if world_size(self.group) > 1:
            return self._compute_sharded()
        data = {role: rows for role, store in self._stores.items() if (rows := store.rows()) is not None}
        check_roles({role: int(role in data) for role in _ROLES}, "this process")
        return evaluate_rows(self.evaluator, data)

    def as_torchmetrics(self) -> Any:
        """A fresh :class:`~objretrieval.metrics.torchmetrics_adapter.TorchmetricsRetrieval` with these
        settings (needs torchmetrics; under DDP it gathers every rank's embeddings, see that module)."""
        # Imported only here: torchmetrics is an optional dependency.
        from objretrieval.metrics.torchmetrics_adapter import TorchmetricsRetrieval

        return TorchmetricsRetrieval(**self._settings, process_group=self.group)

    # -- state --------------------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """The stored rows, one tensor per role and field (None where nothing is stored)."""
        state: dict[str, Any] = {"version": 1}
        for role, store in self._stores.items():
            rows = store.rows()
            state[role] = None if rows is None else vars(rows).copy()
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a RetrievalMetrics state (expected the extra state of state_dict())")
        self.reset()
        device = self._anchor.device
        for role in _ROLES:
            saved = state.get(role)
            if saved is not None:
                idx = saved["indices"]
                rows = Rows(
                    saved["embeddings"].to(device),
                    saved["labels"].to(device),
                    None if idx is None else idx.to(device),
                )
                self._check_compatible(rows, role)
                self._stores[role].append(rows)

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> RetrievalMetrics:
        # Stored rows follow the module's device; their dtype stays storage_dtype (.half() does not round
        # them), so only the device of ``fn``'s result on the anchor is applied.
        super()._apply(fn, *args, **kwargs)
        device = self._anchor.device
        for store in self._stores.values():
            store.apply(lambda t: t.to(device))
        return self

    def _check_compatible(self, rows: Rows, role: Role) -> None:
        """Refuse a batch that cannot join the stored ones: another mode, layout or use of indices."""
        stored = {r: s for r, s in self._stores.items() if s.labels}
        if not stored:
            return
        modes = {"both" if r == "both" else "query/gallery" for r in stored}
        mode = "both" if role == "both" else "query/gallery"
        if mode not in modes:
            raise ValueError(
                f"update(role={role!r}) after updates with role "
                f"{'both' if 'both' in modes else 'query/gallery'}: leave-one-out (role='both') and "
                "query/gallery (role='query'/'gallery') do not mix; call reset() to start another evaluation"
            )
        first = next(iter(stored.values()))
        check_same_layout(rows.embeddings, rows.labels, first.embeddings[0], first.labels[0])
        if (rows.indices is not None) != bool(first.indices):
            raise ValueError(
                "indices were given to some updates and not to others: give them to every update since "
                "the last reset(), or to none"
            )

    # -- the sharded computation --------------------------------------------------------------------------

    def _compute_sharded(self) -> RetrievalResult:
        group, ev = self.group, self.evaluator
        layout = self._agree_layout()
        leave_one_out = layout["both"] > 0
        if leave_one_out:
            queries = gallery = self._shard("both", layout)
        else:
            queries, gallery = self._shard("query", layout), self._shard("gallery", layout)

        # Labels are known everywhere, embeddings stay in their shard: each rank evaluates its own queries.
        relevance = Relevance(
            queries.labels[queries.ids],
            gallery.labels,
            queries.ids if leave_one_out else None,
            ev.label_comparison_fn,
        )
        local_relevant = relevance.count()
        num_relevant = queries.to_global(local_relevant, group)
        max_relevant = int(num_relevant.max())
        # As the evaluator's search: an exhaustive count serves every ranking metric if one needs it, and a
        # kNN then only the neighbour lists.
        exhaustive = ev._depth(num_relevant) is None
        searched = [
            r
            for r in ev.metrics
            if r.spec.needs == "neighbors" or (r.spec.needs == "ranks" and not exhaustive)
        ]
        depth = max((r.depth(max_relevant) or 0 for r in searched), default=0)
        ranks = None
        stats = SearchStats()  # the count's and the kNN's, added (RetrievalResult.search)
        if exhaustive:
            ranks = sharded_relevant_ranks(
                queries,
                gallery,
                local_relevant,
                max(max_relevant, 1),
                leave_one_out=leave_one_out,
                metric=ev.metric,
                label_comparison_fn=ev.label_comparison_fn,
                device=ev.device,
                block_size=ev.block_size,
                precision=ev.precision,
                stats=stats,
                group=group,
            )
        found = None
        if depth:
            neighbors = sharded_knn(
                queries.embeddings,
                None if leave_one_out else gallery.embeddings,
                k=depth,
                metric=ev.metric,
                gallery_ids=None if leave_one_out else gallery.ids,
                query_ids=queries.ids,
                block_size=ev.block_size,
                query_block_size=_KNN_QUERY_BLOCK,
                device=ev.device,
                precision=ev.precision,
                stats=stats,
                group=group,
            )
            scores, ids = neighbors.scores.cpu(), neighbors.indices.cpu()
            if not exhaustive:
                ranks = ev._ranks_of(ids, relevance, local_relevant)
            if any(r.spec.needs == "neighbors" for r in ev.metrics):  # lists of every query: O(Q x depth)
                found = NeighborLists(
                    queries.to_global(scores, group),
                    queries.to_global(ids, group),
                    queries.labels,
                    gallery.labels,
                    ev.metric != "l2",
                )
        per_query = self._gather_per_query(ranks, queries, max_relevant)
        clustering = None
        if any(r.spec.needs == "clustering" for r in ev.metrics):  # k-means needs every embedding: gathered
            q = queries.to_global(queries.embeddings, group)
            if leave_one_out:
                clustering = (q, queries.labels)
            else:
                g = gallery.to_global(gallery.embeddings, group)
                clustering = (torch.cat([q.float(), g.float()]), torch.cat([queries.labels, gallery.labels]))
        everyone = Relevance(queries.labels, gallery.labels, None, ev.label_comparison_fn)
        result = ev._result(per_query, found, everyone, num_relevant, clustering)
        # a rank without queries still screened its gallery shard against the others'
        return dataclasses.replace(result, search=stats) if stats.queries or stats.screened else result

    def _gather_per_query(
        self, ranks: RelevantRanks | None, queries: GlobalShard, max_relevant: int
    ) -> dict[str, Tensor]:
        """Every query's value of each ranking metric, in global order: one (Q, metrics) float64 exchange."""
        names = [r.name for r in self.evaluator.metrics if r.spec.needs == "ranks"]
        if not names:
            return {}
        local = torch.empty((queries.ids.shape[0], len(names)), dtype=torch.float64)
        if ranks is not None and ranks.num_queries:
            values = self.evaluator._per_query(ranks, max_relevant)
            local = torch.stack([values[name].cpu() for name in names], dim=1)
        everything = queries.to_global(local, self.group)
        return {name: everything[:, i].contiguous() for i, name in enumerate(names)}

    def _agree_layout(self) -> dict[str, int]:
        """What every rank stored (rows per role, dim, dtype, label levels, indices or not), checked to agree.

        One small exchange, so that inconsistent ranks raise the same error everywhere instead of hanging.
        """
        fields = ["both", "query", "gallery", "dim", "dtype", "levels", "indices"]
        stored = [s for s in self._stores.values() if s.labels]
        mine = [len(self._stores[r]) for r in _ROLES]
        if stored:
            x, y = stored[0].embeddings[0], stored[0].labels[0]
            levels = y.shape[1] if y.ndim > 1 else 0
            mine += [x.shape[1], _STORAGE_DTYPES.index(x.dtype), levels, int(bool(stored[0].indices))]
        else:
            mine += [-1, -1, -1, -1]
        mine_t = torch.tensor([mine], device=self._anchor.device)
        table, _ = all_gather_uneven(mine_t, self.group, "RetrievalMetrics state")
        rows = [dict(zip(fields, row, strict=True)) for row in table.tolist()]
        totals: dict[str, int] = {role: sum(row[role] for row in rows) for role in _ROLES}
        check_roles({role: int(totals[role] > 0) for role in _ROLES}, "all ranks")
        with_data = [row for row in rows if row["dim"] >= 0]
        for name in ("dim", "dtype", "levels", "indices"):
            values = {row[name] for row in with_data}
            if len(values) > 1:
                raise ValueError(
                    f"ranks stored different {name} values {sorted(values)}: every rank must update with "
                    "embeddings of one dim and dtype, labels of one shape, and indices on all ranks or none"
                )
        layout = dict(with_data[0])
        layout.update(totals)
        return layout

    def _shard(self, role: Role, layout: dict[str, int]) -> GlobalShard:
        """This rank's rows of ``role`` that survive the global deduplication, and every rank's labels."""
        device = self._anchor.device
        rows = self._stores[role].rows()
        if rows is None:  # this rank saw none: an empty shard of the agreed layout
            label_shape = (0, layout["levels"]) if layout["levels"] else (0,)
            rows = Rows(
                torch.empty(0, layout["dim"], dtype=_STORAGE_DTYPES[layout["dtype"]], device=device),
                torch.empty(label_shape, dtype=torch.int64, device=device),
                torch.empty(0, dtype=torch.int64, device=device) if layout["indices"] else None,
            )
        labels, sizes = all_gather_uneven(rows.labels, self.group, "labels")
        indices = None
        if rows.indices is not None:
            indices, _ = all_gather_uneven(rows.indices, self.group, "indices")
        keep = first_occurrences(labels, indices, _WHAT[role])
        start = shard_offsets(sizes)[rank(self.group)]
        mine = ((keep >= start) & (keep < start + rows.labels.shape[0])).nonzero().squeeze(1)
        everyone, _ = all_gather_uneven(mine, self.group, "ids")
        return GlobalShard(
            rows.embeddings[keep[mine] - start], mine.cpu(), labels[keep].cpu(), everyone.cpu(), device
        )


def check_roles(present: dict[Role, int], where: str) -> None:
    """Refuse to evaluate nothing, one side of a query/gallery evaluation, or both modes at once."""
    if not any(present.values()):
        raise ValueError(f"compute() before any update() on {where}: nothing to evaluate")
    if present["both"]:
        if present["query"] or present["gallery"]:
            raise ValueError(
                f"compute(): {where} stored rows with role 'both' and with role 'query'/'gallery': "
                "leave-one-out and query/gallery do not mix"
            )
        return
    missing = [role for role in ("query", "gallery") if not present[role]]
    if missing:
        raise ValueError(
            f"compute(): no {missing[0]} rows were stored on {where}; call update(..., role={missing[0]!r}) "
            "(query/gallery mode needs both sides)"
        )
