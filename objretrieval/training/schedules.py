"""Per-iteration schedules (DINO's ``cosine_scheduler``) and the set used to train MILE."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from objretrieval._validation import check_positive_int


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    *,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """``epochs * iters_per_epoch`` float64 values: a linear warm-up from ``start_warmup_value`` to
    ``base_value`` over ``warmup_epochs``, then a half cosine from ``base_value`` to ``final_value``."""
    check_positive_int(epochs, "epochs")
    check_positive_int(iters_per_epoch, "iters_per_epoch")
    if check_positive_int(warmup_epochs, "warmup_epochs", minimum=0) > epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters else np.array([])
    iters = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@dataclass(frozen=True, repr=False)
class DINOSchedules:
    """Learning rate, weight decay and teacher momentum per iteration, as DINO and MILE schedule them.

    Build with :meth:`create`; index with the global iteration ``epoch * iters_per_epoch + i``.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @classmethod
    def create(
        cls,
        *,
        epochs: int,
        iters_per_epoch: int,
        lr: float = 5e-6,
        min_lr: float = 1e-6,
        warmup_epochs: int = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        world_size: int = 1,
    ) -> DINOSchedules:
        """MILE's schedules. ``lr`` is multiplied by ``world_size`` only (no batch-size/256 scaling);
        the released model's effective lr is 5e-6. Note that an lr below ``min_lr`` makes the cosine rise."""
        n = (epochs, iters_per_epoch)
        return cls(
            lr=cosine_schedule(lr * world_size, min_lr, *n, warmup_epochs=warmup_epochs),
            weight_decay=cosine_schedule(weight_decay, weight_decay_end, *n),
            momentum=cosine_schedule(momentum_teacher, 1.0, *n),
        )

    def __len__(self) -> int:
        return len(self.lr)

    def __repr__(self) -> str:
        # the per-iteration arrays are state, never printed whole (objretrieval.display): their ends and peak
        parts = [f"iterations={len(self)}"] + [
            f"{name}=(start={v[0]:.4g}, max={v.max():.4g}, end={v[-1]:.4g})"
            for name, v in (("lr", self.lr), ("weight_decay", self.weight_decay), ("momentum", self.momentum))
            if len(v)
        ]
        return f"{type(self).__name__}({', '.join(parts)})"
