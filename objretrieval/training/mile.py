"""MILE's self-supervised training (DINO-style student/teacher over sets of images), as a step helper.

```python
student = create_model("mile_vitl", pretrained_backbone=True, head_dim=65536, norm_last_layer=False)
ssl = MILESelfSupervised(student, DINOLoss(65536, ncrops=10, epochs=epochs))
optimizer = torch.optim.AdamW(ssl.param_groups())
schedules = DINOSchedules.create(epochs=epochs, iters_per_epoch=len(loader), lr=5e-6)
for epoch in range(epochs):
    for i, batch in enumerate(loader):            # MultiCropSetBatch from collate_multicrop_sets
        out = ssl.training_step(batch, optimizer, schedules, epoch=epoch, iteration=epoch * len(loader) + i)
```

View ``c`` of an object is the set embedding of crop ``c`` of each of its images: the student sees every
crop, the teacher the global crops only, and DINO's loss compares differently augmented *set* embeddings of
the same object.

Fixed with respect to the official code (see ``docs/mile.md``): the student has its own LoRA backbone and
the teacher is its copy (upstream shares one frozen ViT, so LoRA never trains), the teacher starts equal to
the student, stays in eval mode and gets no gradients, and objects of a batch never attend to each other.
``batch_mixing_compat=True`` restores the official student forward, where the latents of one crop index
attend over the new views of every object in the batch.

On several processes, :meth:`MILESelfSupervised.ddp_student` wraps the student, and only it, in
``DistributedDataParallel``; a step on shards of any sizes then equals one step on their concatenation.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from objretrieval._validation import check_padded_sets
from objretrieval.data.image_sets import MultiCropSetBatch
from objretrieval.display import ConfigRepr
from objretrieval.distributed.world import all_reduce_sum_, is_distributed, world_size
from objretrieval.losses.dino import DINOLoss
from objretrieval.models.mile import MILE
from objretrieval.training.optim import clip_gradients_per_tensor, ema_update, weight_decay_groups
from objretrieval.training.schedules import DINOSchedules


class SelfSupervisedOutput(NamedTuple):
    """One forward: the loss and the crop-major outputs (row ``c * B + b`` is view c of object b).

    Attributes:
        loss: scalar DINO loss.
        student_latent: (C * B, D) student set embeddings, C = G + L views.
        student_output: (C * B, K) after the DINO head.
        teacher_latent: (G * B, D).
        teacher_output: (G * B, K).
    """

    loss: Tensor
    student_latent: Tensor
    student_output: Tensor
    teacher_latent: Tensor
    teacher_output: Tensor


class StepStats(NamedTuple):
    """What :meth:`MILESelfSupervised.training_step` did: loss value, lr, weight decay and momentum used."""

    loss: float
    lr: float
    weight_decay: float
    momentum: float


def _check_batch(batch: MultiCropSetBatch) -> MultiCropSetBatch:
    g = batch.global_crops
    if not isinstance(g, Tensor) or g.ndim != 6 or g.shape[3] != 3:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"global_crops must be (B, K, G, 3, H, W), got {shape}")
    local = batch.local_crops
    if local is not None and (local.ndim != 6 or local.shape[:2] != g.shape[:2] or local.shape[3] != 3):
        raise ValueError(
            f"local_crops must be (B, K, L, 3, h, w) with B, K = {tuple(g.shape[:2])}, got {tuple(local.shape)}"
        )
    mask = check_padded_sets(g, "global_crops", batch.mask, "object")
    if local is not None:
        check_padded_sets(local, "local_crops", mask, "object")
    return MultiCropSetBatch(g, local, mask)


def _multicrop_views(
    model: MILE, crops: list[Tensor], mask: Tensor | None, mixing: bool
) -> tuple[Tensor, Tensor]:
    """Set latents and head outputs of every crop index, crop-major: (C * B, D), (C * B, K)."""
    b, k = crops[0].shape[:2]
    # one backbone call per resolution: (B, K, c, 3, h, w) -> (B, K, c, D)
    # the batch was validated once by _check_batch
    features = torch.cat([model._encode_valid_sets(group, mask) for group in crops], dim=2)  # (B, K, C, D)
    c = features.shape[2]
    sets = features.permute(2, 0, 1, 3).reshape(c * b, k, -1)
    set_mask = None if mask is None else mask.expand(c, b, k).reshape(c * b, k)
    latent = model.aggregator(sets, set_mask, mixing_groups=c if mixing else None)
    return latent, model.project(latent)


class _StudentViews(nn.Module):
    """The student's share of a step as one module call: what ``DistributedDataParallel`` wraps, since DDP
    prepares its gradient all-reduce in the wrapped module's ``forward``."""

    def __init__(self, student: MILE) -> None:
        super().__init__()
        self.student = student

    def forward(self, crops: list[Tensor], mask: Tensor | None, mixing: bool) -> tuple[Tensor, Tensor]:
        return _multicrop_views(self.student, crops, mask, mixing)


class MILESelfSupervised(ConfigRepr, nn.Module):
    """Student and EMA teacher MILE models with the DINO loss; call :meth:`training_step` from your loop.

    Args:
        student: a :class:`~objretrieval.models.MILE` built with a DINO head (``head_dim=...``).
        loss: the :class:`~objretrieval.losses.DINOLoss`; its ``ncrops`` must equal G + L.
        teacher: the initial teacher; by default a copy of the student.
        batch_mixing_compat: reproduce the official student forward (objects of a batch attend to each
            other's views, one crop index at a time). Off by default: each object is its own set.
        clip_grad: per-tensor gradient-norm clip (3.0); 0 disables.
        freeze_last_layer: epochs during which the head's last layer gets no update (1).
    """

    def __init__(
        self,
        student: MILE,
        loss: DINOLoss,
        *,
        teacher: MILE | None = None,
        batch_mixing_compat: bool = False,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
    ) -> None:
        super().__init__()
        if student.head is None:
            raise ValueError("student needs a DINO head: build it with head_dim=... (65536 in MILE)")
        self.student = student
        self.teacher = copy.deepcopy(student) if teacher is None else teacher
        if self.teacher.head is None:
            raise ValueError("teacher needs a DINO head like the student's")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.loss = loss
        self.batch_mixing_compat = batch_mixing_compat
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self._ddp: DistributedDataParallel | None = None

    def train(self, mode: bool = True) -> MILESelfSupervised:
        super().train(mode)
        self.teacher.eval()  # the teacher is a target, never trained directly: no LoRA dropout
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups over the student's trainable parameters (LoRA, qkv biases, aggregator, gate, head)."""
        return weight_decay_groups(self.student)

    def ddp_student(self, **ddp_kwargs: Any) -> DistributedDataParallel:
        """Train on several processes: wrap the student, and only it, in ``DistributedDataParallel``.

        DDP's reducer then holds the student's trainable parameters (LoRA, qkv biases, aggregator, gate,
        head; the frozen backbone has ``requires_grad=False``). The teacher stays outside it: it follows the
        averaged student by EMA after each optimiser step, identically on every rank. DDP broadcasts the
        student from rank 0 here, and the teacher and the loss centre are broadcast with it, so all ranks
        start equal even from differently seeded models. From then on :meth:`forward` runs the student
        through DDP, and :meth:`training_step` backpropagates :meth:`ddp_loss`, so that a step on shards of
        any sizes equals one step on their concatenation (with ``batch_mixing_compat=False``: mixing lets
        the objects of one rank's batch attend to each other, so the result depends on the sharding).

        Call it once, after moving the module to its device. The DINO centre is averaged over the default
        process group, which is therefore the only group allowed.

        Args:
            **ddp_kwargs: ``DistributedDataParallel`` arguments (``device_ids=[local_rank]`` on GPUs).
                ``find_unused_parameters`` defaults to True: with one key per object the aggregator's
                ``norm_q`` has no influence and gets no gradient.

        Returns:
            The DDP module (e.g. for ``no_sync()``).
        """
        if not is_distributed():
            raise RuntimeError("ddp_student needs torch.distributed: call init_process_group first")
        if self._ddp is not None:
            raise RuntimeError("the student is already wrapped in DistributedDataParallel")
        if ddp_kwargs.get("process_group") not in (None, dist.group.WORLD):
            raise ValueError("process_group: DINOLoss averages its centre over the default group; use that")
        ddp_kwargs.setdefault("find_unused_parameters", True)
        ddp = DistributedDataParallel(_StudentViews(self.student), **ddp_kwargs)
        with torch.no_grad():
            for t in (*self.teacher.parameters(), *self.teacher.buffers(), *self.loss.buffers()):
                dist.broadcast(t, src=0)
        # a plain attribute, not a submodule: it wraps self.student, which state_dict() and .to() already cover
        object.__setattr__(self, "_ddp", ddp)
        return ddp

    def ddp_loss(self, loss: Tensor, batch_size: int) -> tuple[Tensor, float]:
        """The loss to backpropagate and the value to report: this batch's, or under :meth:`ddp_student` the
        global batch's (the same on every rank, so a non-finite loss stops every rank, not one).

        DINO's loss is a mean over this rank's ``n = batch_size`` objects, and DDP averages the gradients of
        the W ranks. With N objects over all ranks, backpropagating ``loss * n * W / N`` makes that average
        the gradient of the loss on the concatenated batch; the plain per-rank mean would weigh each object of
        a rank ``N / (W * n)`` times its due, wrong for uneven shards. Costs one all-reduce of two numbers.
        """
        if self._ddp is None:
            return loss, float(loss.detach())
        n = float(batch_size)
        stats = torch.stack([loss.detach().to(torch.float64) * n, loss.new_tensor(n, dtype=torch.float64)])
        total_loss, total = all_reduce_sum_(stats).tolist()
        return loss * (n * world_size() / total), total_loss / total

    def forward(self, batch: MultiCropSetBatch, *, epoch: int) -> SelfSupervisedOutput:
        """Loss and outputs of one batch (updates the loss centre when the loss module is in training mode)."""
        batch = _check_batch(batch)
        crops = [batch.global_crops] + ([batch.local_crops] if batch.local_crops is not None else [])
        n_views = sum(c.shape[2] for c in crops)
        if n_views != self.loss.ncrops:
            raise ValueError(
                f"the batch has {n_views} crops per image but the loss expects ncrops={self.loss.ncrops}"
            )
        with torch.no_grad():
            t_latent, t_out = _multicrop_views(self.teacher, crops[:1], batch.mask, mixing=False)
        if self._ddp is None:
            s_latent, s_out = _multicrop_views(self.student, crops, batch.mask, self.batch_mixing_compat)
        else:  # through DDP's forward, which prepares the gradient all-reduce of the backward
            s_latent, s_out = self._ddp(crops, batch.mask, self.batch_mixing_compat)
        loss = self.loss(s_out, t_out, epoch)
        return SelfSupervisedOutput(loss, s_latent, s_out, t_latent, t_out)

    def training_step(
        self,
        batch: MultiCropSetBatch,
        optimizer: torch.optim.Optimizer,
        schedules: DINOSchedules,
        *,
        epoch: int,
        iteration: int,
        amp_dtype: torch.dtype | None = None,
    ) -> StepStats:
        """Set lr/weight decay, forward, backward, clip, step, then move the teacher by EMA.

        Under :meth:`ddp_student` the gradients are all-reduced in the backward (clipping sees the averaged
        ones), the loss is scaled for uneven shards (:meth:`ddp_loss`), and the reported loss is the global
        batch's.

        Args:
            batch: a :class:`MultiCropSetBatch`.
            optimizer: built on :meth:`param_groups` (e.g. ``torch.optim.AdamW``).
            schedules: per-iteration lr, weight decay and momentum.
            epoch: current epoch (teacher temperature, last-layer freezing).
            iteration: global iteration index into ``schedules``.
            amp_dtype: autocast dtype for the forward (e.g. ``torch.bfloat16``); the loss stays float32.

        Raises:
            FloatingPointError: when the loss is not finite (the official code stops there too).
        """
        if not 0 <= iteration < len(schedules):
            raise ValueError(f"iteration must be in [0, {len(schedules)}), got {iteration}")
        self.train()
        lr, wd, momentum = (
            float(s[iteration]) for s in (schedules.lr, schedules.weight_decay, schedules.momentum)
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("regularized", False):
                group["weight_decay"] = wd
        device = batch.global_crops.device.type
        with torch.autocast(device, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = self(batch, epoch=epoch)
        loss, value = self.ddp_loss(out.loss, batch.global_crops.shape[0])
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at epoch {epoch}, iteration {iteration}; stopping")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        if self.clip_grad:
            clip_gradients_per_tensor(trainable, self.clip_grad)
        if epoch < self.freeze_last_layer:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        optimizer.step()
        ema_update(self.teacher, self.student, momentum)
        return StepStats(value, lr, wd, momentum)
