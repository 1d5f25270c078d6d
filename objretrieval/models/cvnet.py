"""CVNet's ResNet-101 backbone (Lee et al., CVPR 2022) in torchvision's layout, loading the released weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval.display import ConfigRepr
from objretrieval.models.registry import CheckpointFormat, register_model


class GeM(ConfigRepr, nn.Module):
    """Generalised-mean pooling with a learnable exponent ``p`` (CVNet's global head)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


class CVNetBackbone(ConfigRepr, nn.Module):
    """CVNet's ResNet-101 (pycls layout, expressed with torchvision) with its GeM + linear global head.

    ``local_features`` returns the res4 map AMES uses: the output of the last block of ``layer3`` after the
    residual addition and before its ReLU (1024 channels, stride 16).

    Args:
        global_dim: output of the global head (2048).
    """

    config_attributes: ClassVar[dict[str, str | None]] = {"global_dim": "fc.out_features"}

    def __init__(self, global_dim: int = 2048) -> None:
        super().__init__()
        from torchvision.models import resnet101

        trunk = resnet101(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            trunk.layer1,
            trunk.layer2,
            trunk.layer3,
            trunk.layer4,
        )
        self.pool = GeM()
        self.fc = nn.Linear(2048, global_dim)

    def local_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) BGR-normalised images -> (B, 1024, H/16, W/16) pre-activation res4 features."""
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        for block in self.layer3[:-1]:
            x = block(x)
        last = self.layer3[-1]  # torchvision's Bottleneck, unrolled to stop before its final ReLU
        out = last.relu(last.bn1(last.conv1(x)))
        out = last.relu(last.bn2(last.conv2(out)))
        return last.bn3(last.conv3(out)) + x

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both outputs in one pass: res4 local features (as :meth:`local_features`) and global descriptors."""
        res4 = self.local_features(x)
        return res4, self.fc(self.pool(self.layer4(F.relu(res4))))  # not the in-place ReLU: res4 is returned

    def forward(self, x: Tensor) -> Tensor:
        """(B, global_dim) global descriptors (not normalised)."""
        return self.features(x)[1]


_PYCLS_BLOCK = {
    "f.a": "conv1",
    "f.a_bn": "bn1",
    "f.b": "conv2",
    "f.b_bn": "bn2",
    "f.c": "conv3",
    "f.c_bn": "bn3",
    "proj": "downsample.0",
    "bn": "downsample.1",
}


def _from_cvnet(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """CVNet's checkpoint (``model_state``, query encoder ``encoder_q.`` in pycls names) -> our names."""
    state = obj.get("model_state", obj)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("encoder_k.") or key in ("queue", "queue_ptr"):
            continue  # the momentum encoder and queue of CVNet's training
        key = key.removeprefix("encoder_q.")
        parts = key.split(".")
        if parts[0] == "stem":
            out[{"conv": "conv1", "bn": "bn1"}[parts[1]] + "." + ".".join(parts[2:])] = value
        elif parts[0] in ("s1", "s2", "s3", "s4"):
            layer, block = int(parts[0][1]), int(parts[1][1:]) - 1
            for pycls, ours in _PYCLS_BLOCK.items():
                prefix = pycls.split(".")
                if parts[2 : 2 + len(prefix)] == prefix and len(parts) == 3 + len(prefix):
                    out[f"layer{layer}.{block}.{ours}.{parts[-1]}"] = value
                    break
            else:
                raise KeyError(f"unexpected CVNet key {key!r}")
        elif parts[0] == "head":
            out[".".join(parts[1:])] = value  # head.pool.p -> pool.p, head.fc.* -> fc.*
        else:
            raise KeyError(f"unexpected CVNet key {key!r}")
    return out


CVNET_OFFICIAL = CheckpointFormat(
    "cvnet_official",
    _from_cvnet,
    description="CVNet's released checkpoint: {'model_state': ...} with the pycls ResNet names under encoder_q.",
)


@register_model(formats=[CVNET_OFFICIAL])
def cvnet_resnet101(**overrides: Any) -> CVNetBackbone:
    """CVNet's ResNet-101 backbone (Lee et al., CVPR 2022); load the released checkpoint with ``checkpoint=``."""
    return CVNetBackbone(**overrides)
