"""Cross-batch memory (Wang et al., CVPR 2020): a FIFO of past embeddings used as the loss's references.

Embeddings drift slowly once a model has trained a little, so the embeddings of the last few thousand samples
remain informative references long after their batch: a queue of them gives every anchor many more pairs than
one batch holds, at the cost of one (N, size) similarity matrix. Under ``torch.distributed`` every rank
enqueues the whole global batch in rank order, so all ranks hold the same queue.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from objretrieval._validation import check_embeddings, check_labels, check_positive_int
from objretrieval.batch import MinedPairs, MinedTriplets, as_mined
from objretrieval.display import ConfigRepr
from objretrieval.distributed.world import (
    Group,
    all_gather_uneven,
    check_on_every_rank,
    rank,
    shard_offsets,
    world_size,
)
from objretrieval.losses.base import MetricLoss
from objretrieval.miners.base import Mined, Miner
from objretrieval.precision import compute_dtype


class _Ring(NamedTuple):
    """The memory after an enqueue, committed once the loss has been computed."""

    embeddings: Tensor
    labels: Tensor
    write: int  # the slot the next row goes to
    filled: int


class CrossBatchMemory(ConfigRepr, nn.Module):
    """Wrap a loss so that each batch is compared with a queue of the last ``size`` embeddings seen.

    Each call first enqueues the batch (detached), overwriting the oldest rows, then returns
    ``loss(embeddings, labels, mined, ref_emb=memory, ref_labels=memory_labels, ref_self_index=...)``: every
    row is an anchor against the filled part of the memory, which holds this batch too, so pairs within the
    batch count as well; the pair of a row with its own queued copy is a self-pair, never a positive. Rows
    are compared with past embeddings through the same pair masks and mining as in a plain batch. This is
    pytorch-metric-learning's ``CrossBatchMemory`` (without ``enqueue_mask``), with two deliberate
    differences: the own copy is excluded *before* mining, so it never serves as a miner's hardest positive,
    and it is excluded for a batch of one row too (PML 2.9 keeps that self-pair as a positive). A forward's
    ``indices_tuple`` (pairs mined on the batch) is moved to the memory slots the batch went to, where PML
    reads its batch columns as memory slots.

    The memory is a ring: batch row ``j`` goes to slot ``(write_position + j) % size``, the slots of PML's
    ``embedding_memory``, and the references are the filled slots in slot order. A batch of more than
    ``size`` rows keeps its last ``size`` rows in the memory; its earlier rows are still anchors, against the
    memory without their own copy.

    Memory: buffers ``embedding_memory`` (size, D) and ``label_memory`` (size,) int64, with the write position
    and fill count in the module's extra state, so ``.to(device)``, ``state_dict()`` and ``load_state_dict()``
    carry and resume the queue. D is fixed by ``embedding_size`` or by the first batch. While the memory is
    empty (first call, after :meth:`reset`) it is allocated in the compute dtype of the batch (float32, or
    float64 for float64 embeddings) on the batch's device; later batches are cast to the memory's dtype, so
    ``.half()`` halves it, and the memory follows the embeddings to their device.

    Gradient: the memory is detached, so the gradient flows only through the anchors (this call's
    embeddings), as in the paper and in PML.

    Distributed: under ``torch.distributed`` (``group``, or the default group once initialised) the batch is
    gathered from every rank in rank order (uneven sizes allowed, no gradient) and the global batch is
    enqueued on every rank, so every rank holds the identical queue, as one process fed the concatenated
    batches would. The loss is then this rank's embeddings as anchors against that memory; each rank's own
    rows are its self-pairs. Since each rank's loss depends only on its own anchors, the gradient of rank r's
    loss with respect to its rows is that of a single process's loss on the concatenated batch, for a loss
    that sums over anchors or pairs (``reduction="sum"``); DDP's averaging then gives ``1 / world_size`` of the
    single-process parameter gradient. For a loss averaged over anchors (``MultiSimilarityLoss``) with equal
    batches on every rank, DDP's average equals the single-process gradient; a loss averaged over pairs or
    active pairs (``ContrastiveLoss``'s ``"mean_nonzero"``) is averaged per rank instead. Keep the wrapper
    outside the ``DistributedDataParallel`` module: each call replaces its buffers (out of place), which DDP's
    buffer broadcast does not follow, and the queues agree without it.

    Args:
        loss: the wrapped :class:`~objretrieval.losses.MetricLoss`; it must accept references
            (``supports_ref``: not ``ProxyAnchorLoss``, ``SmoothAPLoss``, ``ContextualLoss``...).
        size: number of embeddings the memory keeps (>= 1).
        miner: optional :class:`~objretrieval.miners.Miner` run on (batch, memory) with the self-pairs
            excluded; without one the loss sees every (row, memory) pair.
        embedding_size: the embedding dimension, to allocate the memory now (else at the first call).
        group: process group for the distributed gather (None: the default group, if initialised).

    Example:
        ```python
        import torch
        from objretrieval.losses import MultiSimilarityLoss
        from objretrieval.losses.cross_batch_memory import CrossBatchMemory

        loss_fn = CrossBatchMemory(MultiSimilarityLoss(), size=64)
        for _ in range(3):
            x = torch.randn(16, 8, requires_grad=True)
            loss_fn(x, torch.randint(0, 4, (16,))).backward()
        print(loss_fn.num_filled, loss_fn.is_full)  # 48 False
        ```
    """

    embedding_memory: Tensor
    label_memory: Tensor

    def __init__(
        self,
        loss: MetricLoss,
        size: int,
        *,
        miner: Miner | None = None,
        embedding_size: int | None = None,
        group: Group = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, MetricLoss):
            raise TypeError(f"loss must be an objretrieval MetricLoss, got {type(loss).__name__}")
        if not loss.supports_ref:
            raise ValueError(
                f"loss: {type(loss).__name__} does not accept references (ref_emb), so it cannot use a "
                "cross-batch memory; wrap a pair or triplet loss (ContrastiveLoss, MultiSimilarityLoss, ...)"
            )
        if miner is not None and not isinstance(miner, Miner):
            raise TypeError(f"miner must be an objretrieval Miner or None, got {type(miner).__name__}")
        self.loss = loss
        self.miner = miner
        self.size = check_positive_int(size, "size")
        dim = 0 if embedding_size is None else check_positive_int(embedding_size, "embedding_size")
        self.group = group
        # dim 0 marks "not fixed yet": the first batch (or a loaded checkpoint) fixes it
        self.register_buffer("embedding_memory", torch.zeros(self.size, dim))
        self.register_buffer("label_memory", torch.zeros(self.size, dtype=torch.int64))
        self._write = 0  # the slot the next row goes to
        self._filled = 0

    @property
    def embedding_size(self) -> int | None:
        """D of the memory; None until the first batch (or a loaded checkpoint) fixes it."""
        return int(self.embedding_memory.shape[1]) or None

    @property
    def num_filled(self) -> int:
        """How many slots hold an embedding (at most ``size``)."""
        return self._filled

    @property
    def is_full(self) -> bool:
        """Whether every slot holds an embedding (from now on each row overwrites the oldest)."""
        return self._filled == self.size

    def memory(self) -> tuple[Tensor, Tensor]:
        """The queued embeddings and labels, oldest first: (num_filled, D) and (num_filled,) int64."""
        oldest = (self._write - self._filled) % self.size
        order = (torch.arange(self._filled, device=self.label_memory.device) + oldest) % self.size
        return self.embedding_memory[order], self.label_memory[order]

    def reset(self) -> None:
        """Empty the memory (its dimension stays; dtype and device follow the next batch)."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self._write = self._filled = 0

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        """Enqueue the (global) batch, then the wrapped loss of this rank's rows against the memory.

        Args:
            embeddings: (N, D) floating tensor of this rank's batch.
            labels: (N,) integer labels.
            indices_tuple: pairs or triplets mined on this batch alone (``miner(embeddings, labels)``, ours or
                PML's index tuples), added to those the wrapper's ``miner`` selects in the memory, as in
                PML; needs ``miner`` (without one every memory pair is used already).

        Returns:
            The wrapped loss's scalar (float32, or float64 for float64 inputs).
        """
        embeddings, labels = check_on_every_rank(
            lambda: self._checked(embeddings, labels, indices_tuple), "CrossBatchMemory", self.group
        )
        ring, self_index = self._enqueued(embeddings, labels)
        if embeddings.shape[0] == 0:  # this rank had no rows this step: nothing to learn, graph kept
            self._commit(ring)
            return (embeddings * 0).sum().to(compute_dtype(embeddings))
        ref, ref_labels = ring.embeddings[: ring.filled], ring.labels[: ring.filled]
        mined = self._mine(embeddings, labels, ref, ref_labels, self_index, indices_tuple)
        loss = self.loss(embeddings, labels, mined, ref, ref_labels, ref_self_index=self_index)
        self._commit(ring)  # only now: a loss or miner that raises leaves the queue as it was
        return loss

    def _checked(self, embeddings: Any, labels: Any, indices_tuple: Any) -> tuple[tuple[Tensor, Tensor], Any]:
        """This rank's batch, checked, and what every rank must agree on; under torch.distributed a rank may
        bring no rows (the others' batches are still enqueued)."""
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if indices_tuple is not None and self.miner is None:
            raise ValueError(
                "indices_tuple adds mined pairs to those of the wrapper's miner; without a miner every "
                "(row, memory) pair is used already, so pass miner= to CrossBatchMemory"
            )
        empty_rank = world_size(self.group) > 1 and embeddings.ndim == 2 and embeddings.shape[0] == 0
        x = embeddings if empty_rank else check_embeddings(embeddings, "embeddings")
        y = check_labels(labels, "labels", x.shape[0], "embeddings").to(x.device)
        return (x, y), (("dim", x.shape[1]), ("dtype", str(x.dtype)), ("size", self.size))

    def _global_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Every rank's (checked) rows and labels in rank order, and each rank's number of rows."""
        if world_size(self.group) == 1:
            return x, y, [x.shape[0]]
        x_all, sizes = all_gather_uneven(x.detach(), self.group, "embeddings")
        y_all, _ = all_gather_uneven(y, self.group, "labels")
        return x_all, y_all, sizes

    @torch.no_grad()
    def _enqueued(self, embeddings: Tensor, labels: Tensor) -> tuple[_Ring, Tensor]:
        """The ring with the global batch written in (new tensors: the memory itself is not touched yet),
        and the slot of each of this rank's rows (-1: overwritten by a later row of the same batch)."""
        x_all, y_all, sizes = self._global_batch(embeddings, labels)
        memory, memory_labels = self._storage(x_all)
        n = x_all.shape[0]
        kept = torch.arange(max(n - self.size, 0), n, device=x_all.device)  # later rows overwrite earlier
        slots = (self._write + kept) % self.size
        # out of place: a graph built on the previous memory (an earlier call not yet backpropagated) keeps it
        ring = _Ring(
            memory.index_copy(0, slots, x_all[kept].to(memory.dtype)),
            memory_labels.index_copy(0, slots, y_all[kept]),
            (self._write + n) % self.size,
            min(self._filled + n, self.size),
        )
        global_index = torch.full((n,), -1, dtype=torch.int64, device=x_all.device)
        global_index[kept] = slots
        start = shard_offsets(sizes)[rank(self.group)]
        return ring, global_index[start : start + embeddings.shape[0]]

    def _storage(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The memory on ``x``'s device; while empty, new zeros in ``x``'s compute dtype. Fixes D on first use."""
        dim = self.embedding_memory.shape[1]
        if dim not in (0, x.shape[1]):
            raise ValueError(f"embeddings have dim {x.shape[1]} but the memory holds dim {dim}")
        if self._filled == 0:
            memory = torch.zeros(self.size, x.shape[1], dtype=compute_dtype(x), device=x.device)
            return memory, torch.zeros(self.size, dtype=torch.int64, device=x.device)
        return self.embedding_memory.to(x.device), self.label_memory.to(x.device)

    def _commit(self, ring: _Ring) -> None:
        self.embedding_memory, self.label_memory = ring.embeddings, ring.labels
        self._write, self._filled = ring.write, ring.filled

    def _mine(
        self,
        x: Tensor,
        y: Tensor,
        ref: Tensor,
        ref_labels: Tensor,
        self_index: Tensor,
        indices_tuple: Any,
    ) -> Mined | None:
        """The miner's selection in the memory, plus the batch's own ``indices_tuple`` moved to memory slots."""
        if self.miner is None:
            return None
        mined = self.miner(x, y, ref, ref_labels, ref_self_index=self_index)
        if indices_tuple is None:
            return mined
        given, _ = as_mined(indices_tuple, x.shape[0], x.shape[0], x.device)
        if isinstance(given, MinedPairs) and isinstance(mined, MinedPairs):
            kept = self_index >= 0  # columns of batch rows still in the memory
            moved = [torch.zeros_like(mined.positive) for _ in range(2)]
            for out, mask in zip(moved, given, strict=True):
                out[:, self_index[kept]] = mask[:, kept]
            return MinedPairs(mined.positive | moved[0], mined.negative | moved[1])
        if isinstance(given, MinedTriplets) and isinstance(mined, MinedTriplets):
            a, p, n = given.anchor, self_index[given.positive], self_index[given.negative]
            kept = (p >= 0) & (n >= 0)
            return MinedTriplets(*(torch.cat([m, g[kept]]) for m, g in zip(mined, (a, p, n), strict=True)))
        raise TypeError(
            f"indices_tuple: the miner yields {type(mined).__name__} but indices_tuple gives "
            f"{type(given).__name__}; pass the same kind"
        )

    def get_extra_state(self) -> dict[str, int]:
        """The ring's write position and fill count, saved with the buffers by ``state_dict()``."""
        return {"write": self._write, "filled": self._filled}

    def set_extra_state(self, state: dict[str, int]) -> None:
        write, filled = int(state["write"]), int(state["filled"])
        if not (0 <= write < self.size and 0 <= filled <= self.size):
            raise ValueError(f"a memory of size {self.size} cannot hold write={write}, filled={filled}")
        self._write, self._filled = write, filled

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A memory whose dimension is not fixed yet takes the checkpoint's (size, D) and dtype; otherwise
        # the usual copy runs, and a different size or dimension raises PyTorch's size-mismatch error.
        incoming = state_dict.get(prefix + "embedding_memory")
        ours = self.embedding_memory
        fits = isinstance(incoming, Tensor) and incoming.ndim == 2 and incoming.shape[0] == self.size
        if fits and ours.shape[1] in (0, incoming.shape[1]):
            self.embedding_memory = torch.empty_like(incoming, device=ours.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
