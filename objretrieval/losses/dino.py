"""DINO's self-distillation loss (Caron et al., ICCV 2021), as MILE trains with it.

The teacher's outputs for the global views, centred and sharpened with a temperature, are the targets of
the student's outputs for every other view:

    L = mean over (g in global views, v in all views, v != g) of
        mean_b sum_k -softmax((t_g - center) / tau_t)_k * log_softmax(s_v / tau_s)_k

and the centre follows the teacher's batch mean: ``center <- m * center + (1 - m) * mean(t)``, the mean over
the global batch under ``torch.distributed`` (shards of any sizes).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_finite_values, check_number, check_positive_int
from objretrieval.display import ConfigRepr
from objretrieval.distributed.world import all_reduce_sum_
from objretrieval.precision import compute_dtype, full_precision, upcast


def teacher_temperature_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up over ``warmup_epochs``, then constant (float64)."""
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    return np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(epochs - warmup_epochs) * teacher_temp,
        )
    )


class DINOLoss(ConfigRepr, nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs and student outputs of the other views.

    Args:
        out_dim: width K of the head outputs.
        ncrops: views per object the student sees (2 global + local crops; 10 in MILE).
        warmup_teacher_temp: first teacher temperature of the warm-up (0.04).
        teacher_temp: teacher temperature after the warm-up (0.07; MILE uses no warm-up, so 0.07 throughout).
        warmup_teacher_temp_epochs: epochs of the linear warm-up (0).
        epochs: length of the per-epoch temperature schedule.
        student_temp: 0.1.
        center_momentum: 0.9.

    Call: ``loss(student_output, teacher_output, epoch)`` with crop-major rows (row ``c * B + b`` is view c
    of object b): student (ncrops * B, K) and teacher (n_global * B, K), where the teacher's views are the
    student's first ``n_global``. Computed in float32 (float64 if an input is float64) with autocast off.
    Non-finite outputs raise, naming the argument and row. Updates :attr:`center` in training mode (a fresh
    loss module starts from a zero centre).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int = 10,
        *,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 0,
        epochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.ncrops = check_positive_int(ncrops, "ncrops", minimum=2)  # at least two views to compare
        self.student_temp = check_number(student_temp, "student_temp", low=0, low_open=True)
        self.center_momentum = check_number(center_momentum, "center_momentum", low=0, high=1)
        for value, name in ((warmup_teacher_temp, "warmup_teacher_temp"), (teacher_temp, "teacher_temp")):
            check_number(value, name, low=0, low_open=True)
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs, self.epochs = warmup_teacher_temp_epochs, epochs
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            check_positive_int(epochs, "epochs"),
        )
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        if not 0 <= epoch < len(self.teacher_temp_schedule):
            raise ValueError(f"epoch must be in [0, {len(self.teacher_temp_schedule)}), got {epoch}")
        return float(self.teacher_temp_schedule[epoch])

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        s_rows, t_rows = student_output.shape[0], teacher_output.shape[0]
        if student_output.ndim != 2 or student_output.shape[1] != self.out_dim:
            raise ValueError(
                f"student_output must be (ncrops * B, {self.out_dim}), got {tuple(student_output.shape)}"
            )
        if teacher_output.ndim != 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(
                f"teacher_output must be (n_global * B, {self.out_dim}), got {tuple(teacher_output.shape)}"
            )
        batch = s_rows // self.ncrops
        if batch == 0 or s_rows % self.ncrops or t_rows % batch:
            raise ValueError(
                f"student_output has {s_rows} rows, not a multiple of ncrops={self.ncrops} whose batch size "
                f"divides teacher_output's {t_rows} rows"
            )
        n_global = t_rows // batch
        if not 1 <= n_global <= self.ncrops:
            raise ValueError(f"teacher_output has {n_global} views per object; expected 1..{self.ncrops}")
        check_finite_values(student_output, "student_output")
        check_finite_values(teacher_output, "teacher_output")
        temp = self.teacher_temperature(epoch)
        dtype = compute_dtype(student_output, teacher_output)
        with full_precision(student_output.device):
            teacher = upcast(teacher_output.detach(), dtype)
            targets = F.softmax((teacher - self.center.to(dtype)) / temp, dim=-1).view(n_global, batch, -1)
            log_probs = F.log_softmax(upcast(student_output, dtype) / self.student_temp, dim=-1)
            log_probs = log_probs.view(self.ncrops, batch, -1)
            # cross[g, v] = mean_b sum_k -targets[g, b, k] * log_probs[v, b, k]
            cross = -torch.einsum("gbk,vbk->gv", targets, log_probs) / batch
            same_view = torch.eye(n_global, self.ncrops, dtype=torch.bool, device=cross.device)
            loss = cross.masked_fill(same_view, 0.0).sum() / (n_global * self.ncrops - n_global)
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the teacher's mean row over the global batch (every process's rows, sizes may differ)."""
        rows = upcast(teacher_output, self.center.dtype)
        # sum and row count in one all-reduce: a mean of per-rank means would weigh uneven shards wrongly
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        all_reduce_sum_(stats)
        if stats[-1] == 0:  # 0 / 0 would turn the centre, and every later step, into NaN
            raise ValueError("teacher_output: the global batch is empty on every process; nothing to centre")
        mean = (stats[:-1] / stats[-1]).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
