"""Projection heads used only while training (discarded at retrieval time)."""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from objretrieval._validation import check_positive_int
from objretrieval.display import ConfigRepr


class DINOHead(ConfigRepr, nn.Module):
    """DINO's projection head: MLP -> L2 normalisation -> weight-normalised linear layer without bias.

    ``Linear(in, hidden) -> GELU -> [Linear(hidden, hidden) -> GELU] * (nlayers - 2) -> Linear(hidden,
    bottleneck)`` (optionally with BatchNorm after the hidden layers), then ``normalize`` and
    ``Linear(bottleneck, out_dim, bias=False)`` with weight normalisation, its magnitude ``g`` initialised to
    1 and frozen when ``norm_last_layer``.

    The weight norm uses ``torch.nn.utils.parametrizations`` (keys ``last_layer.parametrizations.weight.
    original0`` = g, ``original1`` = v); official DINO checkpoints store ``weight_g``/``weight_v`` and the
    model's checkpoint formats rename them.

    Shapes: (..., in_dim) -> (..., out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        check_positive_int(nlayers, "nlayers")
        self.in_dim, self.out_dim, self.nlayers = in_dim, out_dim, nlayers
        self.use_bn, self.norm_last_layer = use_bn, norm_last_layer
        self.hidden_dim, self.bottleneck_dim = hidden_dim, bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(b), nn.GELU()] if use_bn else [nn.GELU()]
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def rename_weight_norm_keys(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``<prefix>weight_g``/``weight_v`` (``nn.utils.weight_norm``) -> the parametrization's keys."""
    renamed = {}
    for key, value in state.items():
        if key == prefix + "weight_g":
            key = prefix + "parametrizations.weight.original0"
        elif key == prefix + "weight_v":
            key = prefix + "parametrizations.weight.original1"
        renamed[key] = value
    return renamed
