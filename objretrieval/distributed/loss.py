"""A metric-learning loss that sees the batch of every rank: :class:`DistributedLoss`.

Pair and ranking losses learn from the comparisons inside a batch, so under data parallelism each rank's
loss should compare its rows with the global batch, not only with its own shard. :class:`DistributedLoss`
gathers the embeddings and labels of every rank (:func:`~objretrieval.distributed.all_gather_with_grad`) and
evaluates the wrapped loss, and its miner, on them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from objretrieval._validation import check_choice, check_embeddings, check_label_range, check_labels
from objretrieval.distributed.gather import all_gather_with_grad
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    all_reduce_mean_,
    check_on_every_rank,
    comm_device,
    global_rank,
    rank,
    shard_offsets,
    world_size,
)
from objretrieval.losses.base import MetricLoss, ParametricLoss
from objretrieval.miners.base import Miner

#: ``"global"``: the loss of the concatenated batch on every rank; ``"local"``: this rank's rows against it.
Mode = Literal["global", "local"]


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity on ``(x, *params)`` whose backward replaces the parameters' gradients by their mean over ranks.

    ``x`` (the embeddings every loss value depends on) passes through the same node, so each rank reaches the
    all-reduce, even one whose batch gave the parameters no gradient, and reaches it before the gather's
    backward: all ranks issue their collectives in one order.
    """

    @staticmethod
    def forward(ctx: Any, group: Group, x: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        ctx.group = group
        return (x.view_as(x), *(p.view_as(p) for p in params))

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor, *grads: Tensor) -> tuple[Tensor | None, ...]:
        flat = torch.cat([g.reshape(-1) for g in grads]).to(comm_device(grad_x, ctx.group))
        all_reduce_mean_(flat, ctx.group)  # one collective for all the parameters
        means = flat.to(grad_x.device).split([g.numel() for g in grads])
        return (None, grad_x, *(m.view_as(g).to(g.dtype) for m, g in zip(means, grads, strict=True)))


class DistributedLoss(nn.Module):
    """A :class:`~objretrieval.losses.MetricLoss` (and its miner) applied to the batch of every rank.

    Each rank calls it with its own shard, ``loss(model(x_r), y_r)``; shards may differ in size. Rank ``r``
    holds ``n_r`` rows, ``X`` and ``Y`` are the embeddings and labels of all ranks concatenated in rank
    order, ``o_r`` is the first row of rank ``r`` in ``X``, and ``W`` the world size.

    - ``mode="global"``: every rank returns ``L = loss(X, Y, miner(X, Y))``, the single-process loss of the
      concatenated batch. Mining and the neighbourhoods of :class:`~objretrieval.losses.ContextualLoss` are
      global too.
    - ``mode="local"`` (open_clip's ``local_loss``): rank ``r`` returns
      ``L_r = loss(X_r, y_r, mined_r, ref_emb=X, ref_labels=Y, ref_self_index=s_r)``, its own rows
      ``X_r = X[o_r : o_r + n_r]`` as anchors against the global batch, with ``s_r = o_r + arange(n_r)``
      marking each row's own copy in ``X`` (a self-pair, not a positive) and
      ``mined_r = miner(X_r, y_r, ref_emb=X, ref_labels=Y, ref_self_index=s_r)``. Losses whose references
      are their own parameters (the proxy losses) compute ``L_r = loss(x_r, y_r)``, their shard alone.
      Losses that compare the batch with itself but take no references (:class:`~objretrieval.losses.SmoothAPLoss`,
      :class:`~objretrieval.losses.ROADMAPLoss`, :class:`~objretrieval.losses.ContextualLoss`) are refused.

    Outside ``torch.distributed``, or in a world of one, both modes are the wrapped loss itself:
    ``loss(x, y, miner(x, y))``.

    Gradient scale:
        Gradients reach every rank's rows through the gather, whose backward sums them over ranks:
        ``grad x_s = sum_r dL_r / dx_s``. Wrap the model in ``DistributedDataParallel``, which then averages
        its parameters' gradients over the ranks.

        - global: every rank computes the same ``L``, so ``grad x_s = W dL/dx_s``, and DDP's mean divides the
          ``W`` out: each model parameter's gradient is ``dL/dtheta``, the gradient of one process on the
          concatenated batch. The loss's own parameters (proxies, margins) are replicated (the first call
          broadcasts rank 0's, as DDP does for a model) and every rank computes their full ``dL/dP``; they
          need no reduction (in DDP too, the mean of equal values is that value).
        - local: each model parameter's gradient is ``d/dtheta (1/W) sum_r L_r``. The loss's own parameters get
          the same, ``(1/W) sum_r dL_r/dP``: their gradients are averaged over the ranks inside the backward
          pass, so they need no DDP (averaging them again in DDP changes nothing). The returned value is
          ``L_r``, which differs between ranks: average it over ranks for logging.

        A random miner (:class:`~objretrieval.miners.DistanceWeightedMiner`) must draw the same triplets on
        every rank in global mode: give it a ``generator`` seeded identically on every rank. If the draws
        differ, rank ``r`` computes its own ``L_r`` and what is trained is ``(1/W) sum_r L_r``, the mean of
        the ranks' losses (by the gather's backward above).

    Example:
        ``criterion = DistributedLoss(MultiSimilarityLoss(), MultiSimilarityMiner())``, then on each rank
        ``criterion(ddp_model(images), labels).backward()``.

    Args:
        loss: the metric loss; a submodule, so ``.to()``, ``state_dict()`` and :meth:`param_groups` reach it.
        miner: optional miner; its pairs or triplets are the loss's ``indices_tuple``.
        mode: ``"global"`` or ``"local"`` (above).
        group: the process group (default: the default group).
    """

    def __init__(
        self, loss: MetricLoss, miner: Miner | None = None, *, mode: Mode = "global", group: Group = None
    ) -> None:
        super().__init__()
        if not isinstance(loss, MetricLoss):
            raise TypeError(f"loss must be a MetricLoss, got {type(loss).__name__}")
        if miner is not None and not isinstance(miner, Miner):
            raise TypeError(f"miner must be an objretrieval Miner or None, got {type(miner).__name__}")
        self.mode: Mode = check_choice(mode, "mode", Mode)
        # needs_two_classes: the loss compares samples with each other (proxy losses compare them with proxies)
        if self.mode == "local" and not loss.supports_ref and loss.needs_two_classes:
            raise ValueError(
                f"{type(loss).__name__} takes no references (ref_emb), so it cannot compare a rank's embeddings "
                "with the gathered batch in mode='local'; use mode='global'"
            )
        self.loss = loss
        self.miner = miner
        self.group = group
        self._replicated = False

    @torch.no_grad()
    def _replicate(self) -> None:
        """Give every rank rank 0's loss parameters and buffers (proxies, margins), as DDP does for a model:
        ranks seeded differently would otherwise compute different losses and never agree again."""
        source = global_rank(self.group, 0)
        for t in [*self.loss.parameters(), *self.loss.buffers()]:
            shared = t.detach().to(comm_device(t, self.group)).contiguous()
            dist.broadcast(shared, src=source, group=self.group)
            t.copy_(shared)
        self._replicated = True

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of this rank (see the class docstring); every rank of the group must call it.

        Args:
            embeddings: (n_r, D) floating; ``D`` and the dtype must agree over ranks (else every rank raises).
            labels: (n_r,) integer class labels.

        Returns:
            A scalar tensor (float32, or float64 for float64 embeddings).

        Raises:
            ValueError, TypeError: on every rank, naming the rank, when a rank's embeddings or labels are
                malformed (labels outside [0, num_classes) for a loss with per-class parameters), or when
                ranks disagree on the embedding dimension or dtype, or wrap different losses, miners or modes.
        """

        def check() -> tuple[tuple[Tensor, Tensor], Any]:
            x = check_embeddings(embeddings, "embeddings")
            y = check_labels(labels, "labels", x.shape[0], "embeddings").to(x.device)
            if self.loss.indexes_classes:
                assert self.loss.num_classes is not None
                check_label_range(y, "labels", self.loss.num_classes)
            miner = None if self.miner is None else type(self.miner).__name__
            settings: dict[str, Any] = {"loss": type(self.loss).__name__, "miner": miner, "mode": self.mode}
            settings |= {"dim": x.shape[1], "dtype": str(x.dtype)}
            return (x, y), tuple(settings.items())

        # checked before any exchange, so that a bad rank's error is raised on every rank instead of hanging them
        x, y = check_on_every_rank(check, "DistributedLoss", self.group)
        if world_size(self.group) == 1:
            return self._loss(x, y)
        if not self._replicated:
            self._replicate()
        if self.mode == "local" and not self.loss.supports_ref:  # proxies: the shard alone
            return self._local(x, y)
        all_labels, sizes = all_gather_uneven(y, self.group, "labels")
        gathered = all_gather_with_grad(x, self.group, name="embeddings")
        if self.mode == "global":
            return self._loss(gathered, all_labels)
        return self._local(x, y, gathered, all_labels, shard_offsets(sizes)[rank(self.group)])

    def _local(
        self,
        x: Tensor,
        y: Tensor,
        gathered: Tensor | None = None,
        all_labels: Tensor | None = None,
        start: int = 0,
    ) -> Tensor:
        """``L_r``, with the loss's parameters entering through :class:`_MeanGradOverRanks`."""
        trained = {name: p for name, p in self.loss.named_parameters() if p.requires_grad}
        params = None
        through = x if gathered is None else gathered
        if trained:
            through, *values = _MeanGradOverRanks.apply(self.group, through, *trained.values())
            params = dict(zip(trained, values, strict=True))
        if gathered is None:
            return self._loss(through, y, params)
        # the anchors are this rank's rows of the gathered batch (equal to x): so every rank's backward,
        # even of a loss that ignores the references, runs through the gather's all-reduce
        own = torch.arange(start, start + x.shape[0], device=x.device)
        refs = {"ref_emb": through, "ref_labels": all_labels, "ref_self_index": own}
        return self._loss(through[start : start + x.shape[0]], y, params, **refs)

    def _loss(self, x: Tensor, y: Tensor, params: dict[str, Tensor] | None = None, **refs: Any) -> Tensor:
        """The wrapped loss on ``x``, mined first; ``params`` stand in for the loss's own parameters."""
        mined = None if self.miner is None else self.miner(x, y, **refs)
        if params is None:
            return self.loss(x, y, mined, **refs)
        value: Tensor = functional_call(self.loss, params, (x, y, mined), refs)
        return value

    def param_groups(self, lr: float, multiplier: float | None = None) -> list[dict[str, Any]]:
        """The wrapped :class:`~objretrieval.losses.ParametricLoss`'s optimiser groups (see its method)."""
        if not isinstance(self.loss, ParametricLoss):
            raise TypeError(
                f"{type(self.loss).__name__} has no parameters of its own (param_groups is defined for a "
                "ParametricLoss: proxies, learnable margins)"
            )
        return self.loss.param_groups(lr, multiplier)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
