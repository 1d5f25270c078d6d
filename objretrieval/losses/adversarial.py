"""MIC's adversarial decorrelation of two embeddings through gradient reversal (Roth et al., ICCV 2019)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_embeddings, check_positive_int
from objretrieval.display import ConfigRepr
from objretrieval.precision import compute_dtype, full_precision, upcast


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-scale`` in the backward pass."""
    return _GradientReversal.apply(x, scale)


class AdversarialDecorrelationLoss(ConfigRepr, nn.Module):
    """Decorrelate MIC's class embedding from its shared (interclass) embedding.

    A projection network R (Linear(aux_dim, proj_dim), ReLU, Linear(proj_dim, class_dim)) learns to predict the
    class embedding from the shared one: ``L = -mean_i mean_d (c_i * normalize(R(s_i)))_d^2`` with
    ``c = normalize(GR(class))`` and ``s = normalize(GR(shared))``. R minimises L; the gradient reversal GR
    makes the encoders maximise it, removing what one embedding tells about the other. MIC weights it by 2500
    (CUB), 500 (Cars) or 250 (SOP, In-Shop). Parameter names match the official ``AdvLoss``
    (``regressor.0.*``, ``regressor.2.*``).

    Args:
        class_dim: dimension of the class embedding.
        aux_dim: dimension of the shared embedding.
        proj_dim: hidden width of R.
    """

    def __init__(self, class_dim: int, aux_dim: int, proj_dim: int = 512) -> None:
        super().__init__()
        self.class_dim = class_dim = check_positive_int(class_dim, "class_dim")
        self.aux_dim = aux_dim = check_positive_int(aux_dim, "aux_dim")
        self.proj_dim = proj_dim = check_positive_int(proj_dim, "proj_dim")
        self.regressor = nn.Sequential(
            nn.Linear(aux_dim, proj_dim), nn.ReLU(), nn.Linear(proj_dim, class_dim)
        )

    def forward(self, class_features: Tensor, aux_features: Tensor) -> Tensor:
        """Args: class_features (N, class_dim) and aux_features (N, aux_dim). Returns the scalar loss."""
        c = check_embeddings(class_features, "class_features")
        s = check_embeddings(aux_features, "aux_features")
        if c.shape[0] != s.shape[0]:
            raise ValueError(f"class_features has {c.shape[0]} rows but aux_features has {s.shape[0]}")
        if c.shape[1] != self.class_dim or s.shape[1] != self.aux_dim:
            raise ValueError(
                f"expected dims ({self.class_dim}, {self.aux_dim}), got ({c.shape[1]}, {s.shape[1]})"
            )
        with full_precision(c.device):
            dtype = compute_dtype(c, s)
            target = F.normalize(grad_reverse(upcast(c, dtype)), dim=-1)
            source = F.normalize(grad_reverse(upcast(s, dtype)), dim=-1)
            predicted = F.normalize(
                self.regressor(source.to(next(self.regressor.parameters()).dtype)), dim=-1
            )
            return -(target * predicted.to(dtype)).pow(2).mean(dim=-1).mean()

    def param_groups(self, lr: float, weight_decay: float = 1e-6) -> list[dict[str, Any]]:
        """The regressor's optimiser group (MIC: the network's learning rate, weight decay 1e-6)."""
        return [{"params": list(self.parameters()), "lr": lr, "weight_decay": weight_decay}]
