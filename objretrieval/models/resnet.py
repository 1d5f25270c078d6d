"""ResNet trunks for metric learning: torchvision's ResNets without the classifier, with frozen BatchNorm.

Deep metric learning papers fine-tune an ImageNet ResNet50 with batches of a few images per class, far too
few for BatchNorm statistics: MIC and AVSL keep every BatchNorm layer in eval mode (running statistics from
ImageNet). :class:`ResNetTrunk` does that and returns whichever stages a method needs: the pooled ``layer4``
(MIC), the ``layer2``-``layer4`` maps (AVSL) or the early ``layer1`` map (MIC's cluster features).

Parameter names are torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``...), so the official MIC and
AVSL checkpoints, which store torchvision ResNets under ``model.``, map onto it by a prefix change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from torch import Tensor, nn

from objretrieval._validation import check_choice
from objretrieval.display import ConfigRepr

#: torchvision ResNets the trunk accepts, and "resnet10" (BasicBlock x [1, 1, 1, 1]), a tiny one for tests.
Architecture = Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
#: Input metadata of a ResNet fine-tuned from torchvision's ImageNet weights (for :class:`PretrainedCfg`).
IMAGENET_INPUT: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
}
#: Stage names in forward order.
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _torchvision_resnet(arch: Architecture, weights: str | None) -> Any:
    from torchvision import models
    from torchvision.models.resnet import BasicBlock, ResNet

    arch = check_choice(arch, "arch", Architecture)
    if arch == "resnet10":
        if weights is not None:
            raise ValueError("resnet10 has no pretrained weights; pass weights=None")
        return ResNet(BasicBlock, [1, 1, 1, 1])
    return models.get_model(arch, weights=weights)


class ResNetTrunk(ConfigRepr, nn.Module):
    """A torchvision ResNet without pooling and classifier, returning the stage maps asked for.

    Args:
        arch: one of :data:`Architecture`.
        weights: torchvision weights name (e.g. ``"IMAGENET1K_V1"``, downloaded through ``torch.hub``), or
            None for a random initialisation (then load a checkpoint).
        freeze_bn: keep every BatchNorm in eval mode (running statistics never update, even under
            ``model.train()``).
        freeze_bn_affine: also stop training the BatchNorm scale and shift (AVSL freezes them, MIC trains them).

    Attributes:
        stage_channels: output channels of ``layer1`` .. ``layer4``.
    """

    def __init__(
        self,
        arch: Architecture = "resnet50",
        weights: str | None = None,
        *,
        freeze_bn: bool = True,
        freeze_bn_affine: bool = False,
    ) -> None:
        super().__init__()
        net = _torchvision_resnet(arch, weights)
        self.arch = arch
        self.conv1: nn.Conv2d = net.conv1
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.stage_channels: tuple[int, ...] = tuple(
            int(
                next(
                    m for m in reversed(list(getattr(self, s).modules())) if isinstance(m, nn.BatchNorm2d)
                ).num_features
            )
            for s in STAGES
        )
        self.weights, self.freeze_bn, self.freeze_bn_affine = weights, freeze_bn, freeze_bn_affine
        if freeze_bn_affine:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)
        if freeze_bn:
            self.train(self.training)

    @property
    def num_features(self) -> int:
        """Channels of the last stage (2048 for ResNet50)."""
        return self.stage_channels[-1]

    def train(self, mode: bool = True) -> ResNetTrunk:
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def stem(self, images: Tensor) -> Tensor:
        """conv1, bn1, relu, maxpool: (B, 3, H, W) -> (B, 64, H/4, W/4)."""
        if images.dim() != 4 or images.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"images must be (B, {self.conv1.in_channels}, H, W), got shape {tuple(images.shape)}"
            )
        return self.maxpool(self.relu(self.bn1(self.conv1(images))))

    def forward(self, images: Tensor, stages: Sequence[str] = ("layer4",)) -> list[Tensor]:
        """The maps of ``stages`` (names from :data:`STAGES`), computing only up to the last one asked for.

        Args:
            images: (B, 3, H, W) normalised images.
            stages: which stage outputs to return, in forward order.

        Returns:
            One (B, C_s, H_s, W_s) map per requested stage.
        """
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {list(stages)}")
        last = max(STAGES.index(s) for s in stages)
        x = self.stem(images)
        outputs: dict[str, Tensor] = {}
        for name in STAGES[: last + 1]:
            x = getattr(self, name)(x)
            outputs[name] = x
        return [outputs[s] for s in stages]


def resnet_trunk_from_torchvision_keys(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Trunk keys from a checkpoint storing a torchvision ResNet under ``prefix`` (e.g. ``"model."``).

    Keys outside the prefix are left out; so are the ImageNet classifier (``fc.*``) and MIC's
    ``last_linear.*`` heads, which the caller maps itself.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.split(".", 1)[0] in ("fc", "last_linear"):
            continue
        out[name] = value
    return out


def trunk_from_overrides(arch: str, overrides: dict[str, Any], **defaults: Any) -> ResNetTrunk:
    """Build the trunk of a model builder, taking ``arch``, ``weights``, ``freeze_bn`` and ``freeze_bn_affine``
    out of the builder's keyword ``overrides`` (in place); ``defaults`` are the family's own trunk settings."""
    settings: dict[str, Any] = dict(defaults)
    settings.update({k: overrides.pop(k) for k in ("freeze_bn", "freeze_bn_affine") if k in overrides})
    chosen: Any = overrides.pop(
        "arch", arch
    )  # a str from the caller; ResNetTrunk checks it is an Architecture
    return ResNetTrunk(chosen, overrides.pop("weights", None), **settings)
