"""The base class of every metric-learning loss: it owns ``forward``; a loss implements ``compute_loss``.

``forward`` validates the inputs (shapes, dtypes, finite values, integer labels and their range where they
index per-class parameters), moves labels to the embeddings' device, computes in the dtype of
:mod:`objretrieval.precision` (float32; float64 stays float64) with autocast off so half-precision training
is safe, L2-normalises, turns mined pairs or triplets into masks or index vectors, and returns a zero loss
that keeps its graph when a batch offers nothing to learn from. :func:`reduction_divisor` is the one place
a reduction (``"mean_nonzero"``, ``"mean"``, ``"sum"``) becomes a divisor. The call convention is
pytorch-metric-learning's: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor, nn

from objretrieval._validation import check_label_range
from objretrieval.batch import LabelComparison, MinedPairs, MinedTriplets, PairBatch, make_pair_batch
from objretrieval.display import ConfigRepr
from objretrieval.precision import compute_dtype, full_precision

#: How per-pair or per-triplet losses are averaged (pytorch-metric-learning's reducers):
#: ``"mean_nonzero"`` over those with a positive loss (``AvgNonZeroReducer``), ``"mean"`` over all of them
#: (``MeanReducer``), ``"sum"`` (``SumReducer``).
Reduction = Literal["mean_nonzero", "mean", "sum"]

_Loss = TypeVar("_Loss", bound="MetricLoss")


class MetricLoss(ConfigRepr, nn.Module):
    """Base class: subclasses implement :meth:`compute_loss` on a :class:`PairBatch`.

    Class attributes a subclass may override:
        needs_two_classes: the loss compares samples with each other, so a batch of one class is an error.
        supports_ref: the loss accepts ``ref_emb``/``ref_labels`` (e.g. a cross-batch memory).
        accepts_mined: kinds of mined structure the loss uses (pairs and/or triplets); any other raises.
        indexes_classes: labels index per-class parameters, so they must lie in [0, ``num_classes``).
        presets: named settings tuned in a paper or an official code base, ``name -> constructor
            arguments``, built by :meth:`from_preset`. The constructor's defaults are chosen to train from a
            random or a pretrained start; the tuned settings of the papers live here.

    Attributes:
        normalize_embeddings: L2-normalise embeddings (and references) first.
        label_comparison: optional ``(labels, ref_labels) -> (N, M) bool`` "same class" matrix used for
            the positive and negative pairs instead of label equality (e.g. hierarchical labels).
        num_empty_batches: how many batches offered no valid pair or triplet (a zero loss was returned).
        last_parts: for a loss made of several terms, the unweighted terms of the last call (detached
            scalars, name -> tensor), for logging; empty for a single-term loss.
    """

    needs_two_classes: ClassVar[bool] = True
    supports_ref: ClassVar[bool] = True
    accepts_mined: ClassVar[tuple[type, ...]] = (MinedPairs, MinedTriplets)
    indexes_classes: bool = False
    num_classes: int | None = None
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Set by losses with a tiled path (:class:`~objretrieval.losses.tiled.TiledPairLoss`) to take it.
    tiled: bool = False

    def __init__(
        self, *, normalize_embeddings: bool = True, label_comparison: LabelComparison | None = None
    ) -> None:
        super().__init__()
        if label_comparison is not None and not callable(label_comparison):
            raise TypeError(f"label_comparison must be callable, got {type(label_comparison).__name__}")
        self.normalize_embeddings = normalize_embeddings
        self.label_comparison = label_comparison
        self.num_empty_batches = 0
        self.last_parts: dict[str, Tensor] = {}

    @classmethod
    def from_preset(cls: type[_Loss], name: str, **overrides: Any) -> _Loss:
        """The loss with the named settings of :attr:`presets`, updated by ``overrides``.

        Arguments a preset cannot know (``num_classes``, ``embedding_size``) are passed as overrides:
        ``ProxyAnchorLoss.from_preset("kim2020", num_classes=100, embedding_size=512)``.
        """
        if name not in cls.presets:
            available = ", ".join(repr(n) for n in sorted(cls.presets)) or "none"
            raise ValueError(f"unknown preset {name!r} for {cls.__name__}; available: {available}")
        return cls(**{**cls.presets[name], **overrides})

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ref_self_index: Tensor | None = None,
    ) -> Tensor:
        """Compute the loss.

        Args:
            embeddings: (N, D) floating tensor (float16/bfloat16 are computed in float32).
            labels: (N,) integer class labels.
            indices_tuple: mined pairs/triplets: :class:`~objretrieval.miners.MinedPairs`,
                :class:`~objretrieval.miners.MinedTriplets`, or pytorch-metric-learning index tuples.
            ref_emb: optional (M, D) reference embeddings to compare against instead of the batch itself.
            ref_labels: (M,) labels of ``ref_emb``.
            ref_self_index: (N,) int64 column of ``ref_emb`` holding each embedding itself, -1 for none, when
                the references contain the batch (a gathered batch, a cross-batch memory): those pairs are
                self-pairs, never positives, as the diagonal is without ``ref_emb``.

        Returns:
            A scalar tensor (float32, or float64 for float64 inputs).
        """
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if self.tiled:  # before anything forms the (N, N) masks (see objretrieval.losses.tiled)
            unsupported = {"indices_tuple": indices_tuple, "ref_emb": ref_emb, "ref_labels": ref_labels}
            loss = self.tiled_forward(embeddings, labels, ref_self_index=ref_self_index, **unsupported)
        else:
            with full_precision(embeddings.device):
                loss = self.compute_loss(
                    self.prepare_batch(
                        embeddings, labels, indices_tuple, ref_emb, ref_labels, ref_self_index=ref_self_index
                    )
                )
        if loss is None:  # one rule for both paths: the warning, the counter, a zero that keeps the graph
            return self._empty(embeddings)
        return loss

    def prepare_batch(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        ref_self_index: Tensor | None = None,
    ) -> PairBatch:
        """Validate and normalise the inputs of :meth:`forward` into the :class:`PairBatch` losses consume."""
        if ref_emb is not None and not self.supports_ref:
            raise ValueError(f"{type(self).__name__} does not support ref_emb/ref_labels")
        batch = make_pair_batch(
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            normalize=self.normalize_embeddings,
            label_comparison=self.label_comparison,
            ref_self_index=ref_self_index,
        )
        if self.indexes_classes:
            assert self.num_classes is not None
            check_label_range(batch.labels, "labels", self.num_classes)
        if self.needs_two_classes and bool(batch.same_label.all()):
            self.refuse_one_class(batch.labels.shape[0])
        if batch.mined is not None and not isinstance(batch.mined, self.accepts_mined):
            usable = " or ".join(t.__name__ for t in self.accepts_mined) or "no mined pairs or triplets"
            raise TypeError(
                f"indices_tuple: {type(self).__name__} cannot use {type(batch.mined).__name__} (it uses "
                f"{usable}); pass indices_tuple=None or mine what the loss consumes"
            )
        return batch

    def refuse_one_class(self, num_samples: int) -> None:
        """The error of a batch of one class, for losses that compare classes (``needs_two_classes``)."""
        raise ValueError(
            f"labels: all {num_samples} samples share one class; {type(self).__name__} compares classes with "
            "each other and needs at least two in a batch"
        )

    def compute_loss(self, batch: PairBatch) -> Tensor | None:
        """The loss of one batch, or None when the batch has no valid pair/triplet."""
        raise NotImplementedError

    def tiled_forward(self, embeddings: Tensor, labels: Tensor, **arguments: Any) -> Tensor | None:
        """The loss on the tiled path (:class:`~objretrieval.losses.tiled.TiledPairLoss`), or None when the
        batch has no valid pair, by the rule of :meth:`compute_loss`."""
        raise NotImplementedError(f"{type(self).__name__} has no tiled path")

    def _empty(self, x: Tensor) -> Tensor:
        self.num_empty_batches += 1
        warnings.warn(
            f"{type(self).__name__}: no valid pair or triplet in this batch; returning a zero loss "
            f"({self.num_empty_batches} such batches so far)",
            RuntimeWarning,
            stacklevel=3,
        )
        return (x * 0).sum().to(compute_dtype(x))

    def record_parts(self, parts: Mapping[str, Tensor | None]) -> None:
        """Keep the unweighted terms of this call in :attr:`last_parts` (detached; absent terms left out)."""
        self.last_parts = {name: value.detach() for name, value in parts.items() if value is not None}


class ParametricLoss(MetricLoss):
    """A loss with its own learnable parameters (proxies, margins), optimised at a scaled learning rate."""

    #: Learning-rate multiplier used by :meth:`param_groups` when none is given.
    default_lr_multiplier: ClassVar[float] = 1.0
    #: Weight decay of the loss parameters (None: the optimiser's default).
    weight_decay: ClassVar[float | None] = None

    def param_groups(self, lr: float, multiplier: float | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups for this loss's parameters, to append to the model's groups.

        Args:
            lr: the base learning rate.
            multiplier: learning-rate multiplier (default: :attr:`default_lr_multiplier`).
        """
        group: dict[str, Any] = {
            "params": [p for p in self.parameters() if p.requires_grad],
            "lr": lr * (self.default_lr_multiplier if multiplier is None else multiplier),
        }
        if self.weight_decay is not None:
            group["weight_decay"] = self.weight_decay
        return [group]


def reduction_divisor(reduction: Reduction, num_nonzero: Tensor, num_all: Tensor | int) -> Tensor:
    """The divisor of a summed loss: active count, total count, or 1; never below 1 (an empty set gives 0)."""
    if reduction == "sum":
        return torch.ones((), dtype=num_nonzero.dtype, device=num_nonzero.device)
    count = (
        num_nonzero if reduction == "mean_nonzero" else torch.as_tensor(num_all, device=num_nonzero.device)
    )
    return count.to(num_nonzero.dtype).clamp(min=1)


def masked_log1p_sum_exp(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log(1 + sum exp(x))`` over the masked entries along ``dim``: 0 where none, stable, no NaN gradients."""
    x = x.masked_fill(~mask, float("-inf"))
    shift = x.amax(dim=dim, keepdim=True).clamp(min=0.0)  # the "1" is exp(0), part of the max
    total = torch.exp(-shift).squeeze(dim) + torch.exp(x - shift).sum(dim=dim)
    return shift.squeeze(dim) + torch.log(total)
