""":class:`~objretrieval.metrics.streaming.RetrievalMetrics` as a ``torchmetrics.Metric`` (torchmetrics optional).

torchmetrics synchronises states by gathering them, so under DDP this adapter gathers every rank's stored
embeddings to every rank (O(N x D) per rank) and evaluates them in one process per rank; the native
:class:`~objretrieval.metrics.streaming.RetrievalMetrics` keeps each rank's shard and searches it in place.
The values are the same: rows are gathered in rank order, so duplicates and ties resolve as in the native
module. A rank that never updated contributes no rows (as in the native module); before the gather the ranks
agree on the stored layout, so ranks that stored different embedding dims or dtypes, or label shapes, raise the
same error naming them instead of breaking the collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import torchmetrics
    from torchmetrics.utilities import dim_zero_cat
    from torchmetrics.utilities.distributed import gather_all_tensors
except ImportError as err:  # an optional dependency: say which package is missing
    raise ImportError(
        "objretrieval.metrics.torchmetrics_adapter needs torchmetrics: pip install torchmetrics "
        "(RetrievalMetrics itself works without it)"
    ) from err

from objretrieval.display import ConfigRepr
from objretrieval.distributed.world import Group, all_gather_uneven
from objretrieval.metrics.evaluator import Average
from objretrieval.metrics.ranks import LabelComparison
from objretrieval.metrics.retrieval import NoRelevantPolicy
from objretrieval.metrics.streaming import (
    _ROLES,
    ENGINE_ARGUMENTS,
    Role,
    Rows,
    build_engine,
    check_roles,
    check_same_layout,
    check_update,
    evaluate_rows,
)
from objretrieval.search import Backend, Metric
from objretrieval.search.exact import Precision

#: The dtypes stored embeddings can have, by their code in the layout the ranks exchange before a sync.
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TorchmetricsRetrieval(ConfigRepr, torchmetrics.Metric):
    """The retrieval metrics of :class:`~objretrieval.metrics.RetrievalEvaluator` as a ``torchmetrics.Metric``.

    ``update(embeddings, labels, indices=None, *, role="both")`` and the arguments are those of
    :class:`~objretrieval.metrics.streaming.RetrievalMetrics` (:meth:`RetrievalMetrics.as_torchmetrics`
    builds one with the same settings); :meth:`compute` returns ``{name: 0-d float64 tensor}``, so
    ``self.log_dict(metric.compute())`` logs them all in Lightning. ``forward`` only updates and returns None
    (a batch alone has no meaningful retrieval value). The states are torchmetrics list states reduced by
    concatenation (``dist_reduce_fx="cat"``). That sync gathers every rank's embeddings to every rank
    (O(N x D) each); :class:`~objretrieval.metrics.streaming.RetrievalMetrics` itself keeps them sharded. A rank
    that never updated joins the sync with empty states (torchmetrics' own stand-in, a 1-D float32 tensor,
    cannot be gathered with the other ranks' states: gloo aborts the process), so it contributes no rows.

    The arguments ``metrics``, ``metric``, ``no_relevant``, ``average``, ``label_comparison_fn``,
    ``block_size``, ``device``, ``kmeans_seed`` and ``storage_dtype`` are those of
    :class:`~objretrieval.metrics.streaming.RetrievalMetrics`.

    Args:
        **kwargs: passed to ``torchmetrics.Metric`` (``process_group``, ``sync_on_compute``, ...).
            ``compute_with_cache`` defaults to False here: torchmetrics' cache is per rank and cleared by an
            update, so after updates on some ranks only, the others would return their cached value and skip
            the gather the updated ranks wait in.
    """

    # Lists of per-update tensors (a distributed sync concatenates each into one tensor).
    embeddings: list[Tensor]
    labels: list[Tensor]
    indices: list[Tensor]
    roles: list[Tensor]
    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    config_attributes = ENGINE_ARGUMENTS

    def __init__(
        self,
        metrics: Sequence[str] = ("precision@1", "r_precision", "map@r"),
        *,
        metric: Metric = "cosine",
        no_relevant: NoRelevantPolicy = "exclude",
        average: Average = "query",
        label_comparison_fn: LabelComparison | None = None,
        block_size: int = 4096,
        device: torch.device | str | None = None,
        kmeans_seed: int = 1234,
        storage_dtype: torch.dtype | None = None,
        precision: Precision = "float32",
        backend: Backend = "torch",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        self.evaluator, self.storage_dtype = build_engine(
            metrics,
            metric=metric,
            no_relevant=no_relevant,
            average=average,
            label_comparison_fn=label_comparison_fn,
            block_size=block_size,
            device=device,
            kmeans_seed=kmeans_seed,
            storage_dtype=storage_dtype,
            precision=precision,
            backend=backend,
        )
        # Per row: embedding, label, dataset index (-1: none given) and role (its position in _ROLES).
        for name in ("embeddings", "labels", "indices", "roles"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Any, labels: Any, indices: Any = None, *, role: Role = "both") -> None:
        x, y, idx, role = check_update(
            embeddings, labels, indices, role, self.evaluator.label_comparison_fn is not None
        )
        n = x.shape[0]
        x = x.detach().to(device=self.device, dtype=self.storage_dtype or x.dtype)
        if self.labels:  # refused now, not as a failing concatenation (or a silent dtype promotion) later
            check_same_layout(x, y, self.embeddings[0], self.labels[0])
        self.embeddings.append(x)
        self.labels.append(y.to(self.device))
        self.indices.append(
            idx.to(self.device) if idx is not None else torch.full((n,), -1, device=self.device)
        )
        self.roles.append(torch.full((n,), _ROLES.index(role), device=self.device))

    def compute(self) -> dict[str, Tensor]:
        if not isinstance(self.labels, Tensor) and not self.labels:  # a sync makes each state one tensor
            raise ValueError("compute() before any update(): nothing to evaluate")
        embeddings, labels = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels)
        indices, roles = dim_zero_cat(self.indices), dim_zero_cat(self.roles)
        given = indices >= 0
        if bool(given.any()) and not bool(given.all()):
            raise ValueError(
                "indices were given to some updates and not to others: give them to every update since "
                "the last reset(), or to none"
            )
        data = {}
        for code, role in enumerate(_ROLES):
            rows = (roles == code).nonzero().squeeze(1)
            if rows.numel():
                data[role] = Rows(
                    embeddings[rows], labels[rows], indices[rows] if bool(given.all()) else None
                )
        check_roles({role: int(role in data) for role in _ROLES}, "this metric")
        result = evaluate_rows(self.evaluator, data)
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in result.metrics.items()}

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Group = None) -> None:
        # torchmetrics' hook that gathers the states (undone after compute): every rank first learns what
        # the others stored, so that bad layouts raise everywhere and empty ranks join with empty states.
        self._join_layout(process_group or self.process_group)
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def _join_layout(self, group: Group) -> None:
        """Agree on (dim, dtype, label levels) with every rank, raising on all ranks where they differ; a rank
        without rows then stores empty states of that layout."""
        stored = bool(self.labels)
        mine = [0, -1, -1, -1]
        if stored:
            x, y = self.embeddings[0], self.labels[0]
            mine = [1, x.shape[1], _FLOAT_DTYPES.index(x.dtype), y.shape[1] if y.ndim > 1 else 0]
        table, _ = all_gather_uneven(torch.tensor([mine], device=self.device), group, "layout")
        rows = table.tolist()
        held = [r for r, row in enumerate(rows) if row[0]]
        if not held:
            raise ValueError("compute() before any update() on every rank: nothing to evaluate")
        for column, what in ((1, "embedding dim"), (2, "embedding dtype"), (3, "label levels")):
            if len({rows[r][column] for r in held}) > 1:
                shown = [_FLOAT_DTYPES[rows[r][2]] if column == 2 else rows[r][column] for r in held]
                per_rank = ", ".join(f"rank {r}: {v}" for r, v in zip(held, shown, strict=True))
                raise ValueError(
                    f"ranks stored different {what} ({per_rank}): every rank must update with embeddings of "
                    "one dim and dtype (storage_dtype fixes the dtype) and labels of one shape"
                )
        if not stored:
            _, dim, dtype, levels = rows[held[0]]
            self.embeddings = [torch.empty((0, dim), dtype=_FLOAT_DTYPES[dtype], device=self.device)]
            self.labels = [
                torch.empty((0, levels) if levels else (0,), dtype=torch.int64, device=self.device)
            ]
            self.indices = [torch.empty(0, dtype=torch.int64, device=self.device)]
            self.roles = [torch.empty(0, dtype=torch.int64, device=self.device)]

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update`: no batch value is computed (see the class docstring)."""
        self.update(*args, **kwargs)
