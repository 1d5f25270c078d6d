"""Training helpers that users call from their own loops (no closed trainer).

- :class:`MILESelfSupervised`: MILE's DINO-style student/teacher training step.
- :class:`MICTraining`, :class:`InterclassClusters`, :data:`MIC_PRESETS`: MIC's two-task steps with adversarial
  decorrelation, and its cluster pseudo-labels and their schedule.
- :class:`DINOSchedules`, :func:`cosine_schedule`: per-iteration lr, weight decay and momentum.
- :func:`weight_decay_groups`, :func:`clip_gradients_per_tensor`, :func:`ema_update`: optimiser plumbing.
"""

from objretrieval.training.mic import (
    MIC_PRESETS,
    InterclassClusters,
    MICLossOutput,
    MICPreset,
    MICStepStats,
    MICTraining,
    class_centred,
    cluster_labels,
)
from objretrieval.training.mile import MILESelfSupervised, MultiCropSetBatch, SelfSupervisedOutput, StepStats
from objretrieval.training.optim import clip_gradients_per_tensor, ema_update, weight_decay_groups
from objretrieval.training.schedules import DINOSchedules, cosine_schedule

__all__ = [
    "MIC_PRESETS",
    "DINOSchedules",
    "InterclassClusters",
    "MICLossOutput",
    "MICPreset",
    "MICStepStats",
    "MICTraining",
    "MILESelfSupervised",
    "MultiCropSetBatch",
    "SelfSupervisedOutput",
    "StepStats",
    "class_centred",
    "clip_gradients_per_tensor",
    "cluster_labels",
    "cosine_schedule",
    "ema_update",
    "weight_decay_groups",
]
