"""Training helpers that users call from their own loops (no closed trainer).

- :class:`MILESelfSupervised`: MILE's DINO-style student/teacher training step.
- :class:`DINOSchedules`, :func:`cosine_schedule`: per-iteration lr, weight decay and momentum.
- :func:`weight_decay_groups`, :func:`clip_gradients_per_tensor`, :func:`ema_update`: optimiser plumbing.
"""

from objretrieval.training.mile import MILESelfSupervised, MultiCropSetBatch, SelfSupervisedOutput, StepStats
from objretrieval.training.optim import clip_gradients_per_tensor, ema_update, weight_decay_groups
from objretrieval.training.schedules import DINOSchedules, cosine_schedule

__all__ = [
    "DINOSchedules",
    "MILESelfSupervised",
    "MultiCropSetBatch",
    "SelfSupervisedOutput",
    "StepStats",
    "clip_gradients_per_tensor",
    "cosine_schedule",
    "ema_update",
    "weight_decay_groups",
]
