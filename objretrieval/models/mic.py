"""MIC (Roth, Brattoli and Ommer, "MIC: Mining Interclass Characteristics for Improved Metric Learning", ICCV 2019).

A ResNet50 trunk with frozen BatchNorm statistics feeds two linear heads on the pooled ``layer4`` output:

- the **class** head, trained on the class labels and used for retrieval;
- the **shared** (interclass) head, trained on cluster pseudo-labels of class-centred features, so it captures
  what classes share (pose, colour, background).

An adversarial projection network decorrelates the two (:class:`~objretrieval.losses.AdversarialDecorrelationLoss`)
and the step helper :class:`~objretrieval.training.MICTraining` alternates the two tasks' updates. The first
pseudo-labels come from :meth:`MIC.cluster_features`, an average-pooled ``layer1`` descriptor.

```python
model = create_model("mic_resnet50", weights="IMAGENET1K_V1")          # or checkpoint="checkpoint_Class.pth.tar"
class_embedding = model.embed(images)                                  # (B, 128), unit norm
```
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval._validation import check_positive_int
from objretrieval.display import ConfigRepr
from objretrieval.models.checkpoint import unwrap_state_dict
from objretrieval.models.registry import CheckpointFormat, PretrainedCfg, register_model
from objretrieval.models.resnet import (
    IMAGENET_INPUT,
    ResNetTrunk,
    resnet_trunk_from_torchvision_keys,
    trunk_from_overrides,
)


class MICOutput(NamedTuple):
    """One forward pass of :class:`MIC`.

    Attributes:
        class_embedding: (B, class_dim) unit-norm embedding of the class head (the retrieval embedding).
        shared_embedding: (B, shared_dim) unit-norm embedding of the shared (interclass) head.
        pooled: (B, C) globally average-pooled last trunk stage (2048-d for ResNet50), before the heads.
    """

    class_embedding: Tensor
    shared_embedding: Tensor
    pooled: Tensor


class MIC(ConfigRepr, nn.Module):
    """MIC's network: a :class:`~objretrieval.models.ResNetTrunk` and the class and shared linear heads.

    Args:
        trunk: the ResNet trunk; MIC keeps BatchNorm statistics frozen and trains the affine parameters.
        class_dim: class embedding size (128).
        shared_dim: shared embedding size (128).
        cluster_pool: ``(kernel, stride)`` of the average pooling of ``layer1`` in :meth:`cluster_features`;
            (18, 12) turns the 56x56 map of a 224 input into 4x4 (a 4096-d descriptor for ResNet50).
    """

    def __init__(
        self,
        trunk: ResNetTrunk,
        class_dim: int = 128,
        shared_dim: int = 128,
        cluster_pool: tuple[int, int] = (18, 12),
    ) -> None:
        super().__init__()
        if not isinstance(trunk, ResNetTrunk):
            raise TypeError(f"trunk must be a ResNetTrunk, got {type(trunk).__name__}")
        if not (isinstance(cluster_pool, (tuple, list)) and len(cluster_pool) == 2):
            raise TypeError(f"cluster_pool must be a (kernel, stride) pair, got {cluster_pool!r}")
        self.trunk = trunk
        self.class_head = nn.Linear(trunk.num_features, check_positive_int(class_dim, "class_dim"))
        self.shared_head = nn.Linear(trunk.num_features, check_positive_int(shared_dim, "shared_dim"))
        self.cluster_pool = (
            check_positive_int(cluster_pool[0], "cluster_pool kernel"),
            check_positive_int(cluster_pool[1], "cluster_pool stride"),
        )

    @property
    def class_dim(self) -> int:
        return self.class_head.out_features

    @property
    def shared_dim(self) -> int:
        return self.shared_head.out_features

    def _pooled(self, images: Tensor) -> Tensor:
        (x,) = self.trunk(images, ("layer4",))
        return x.mean(dim=(2, 3))  # global average pooling (the official 7x7 pool at 224 px)

    def forward(self, images: Tensor) -> MICOutput:
        """Args: images (B, 3, H, W), normalised. Returns the two unit-norm embeddings and the pooled features."""
        pooled = self._pooled(images)
        return MICOutput(
            F.normalize(self.class_head(pooled), dim=-1),
            F.normalize(self.shared_head(pooled), dim=-1),
            pooled,
        )

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, class_dim) unit-norm class embeddings, the ones MIC retrieves with."""
        return F.normalize(self.class_head(self._pooled(images)), dim=-1)

    def cluster_features(self, images: Tensor) -> Tensor:
        """MIC's descriptor for the first clustering: ``layer1`` average-pooled, flattened and L2-normalised.

        Early-layer features group images by appearance factors (colour, pose, background) rather than by
        class, which is what the shared head should learn.

        Args:
            images: (B, 3, H, W) normalised images.

        Returns:
            (B, C1 * h * w) unit-norm descriptors; 4096-d for ResNet50 at 224 px.
        """
        (x,) = self.trunk(images, ("layer1",))
        kernel, stride = self.cluster_pool
        if min(x.shape[-2:]) < kernel:
            raise ValueError(
                f"the layer1 map of these images is {tuple(x.shape[-2:])}, smaller than the cluster_pool kernel "
                f"{kernel}; use larger images (layer1 is H/4 x W/4) or build the model with a smaller "
                "cluster_pool=(kernel, stride)"
            )
        return F.normalize(F.avg_pool2d(x, kernel, stride).flatten(1), dim=-1)


def convert_official_mic(obj: Any) -> dict[str, Tensor]:
    """An official MIC checkpoint (``checkpoint_Class.pth.tar`` or its ``state_dict``) -> :class:`MIC` keys.

    ``model.*`` -> ``trunk.*``; ``model.last_linear.Class.*`` -> ``class_head.*`` and ``...Shared.*`` ->
    ``shared_head.*``. The ``layer_blocks.{0..3}.*`` entries are dropped: they are the same tensors as
    ``model.layer1..4`` listed a second time (the official network keeps the stages in a ModuleList too).
    """
    state = unwrap_state_dict(obj)
    if "model.last_linear.Class.weight" not in state:
        raise KeyError("not an official MIC state dict: no model.last_linear.Class.weight")
    out = {f"trunk.{k}": v for k, v in resnet_trunk_from_torchvision_keys(state, "model.").items()}
    for task, head in (("Class", "class_head"), ("Shared", "shared_head")):
        for kind in ("weight", "bias"):
            out[f"{head}.{kind}"] = state[f"model.last_linear.{task}.{kind}"]
    unknown = [k for k in state if not k.startswith(("model.", "layer_blocks."))]
    if unknown:
        raise KeyError(f"unexpected keys in an official MIC state dict: {unknown[:10]}")
    return out


def _numpy_scalar_globals() -> tuple[Any, ...]:
    """What ``torch.load(weights_only=True)`` needs to rebuild numpy scalars (the official progress log has them).

    numpy >= 2 moved ``numpy.core`` to ``numpy._core``; files pickled with numpy 1 name the old module, so the
    scalar constructor is registered under both names.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = tuple(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_))
    return (scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes)


MIC_OFFICIAL = CheckpointFormat(
    "mic_official",
    convert_official_mic,
    # the file also pickles the training arguments and the metric log (lists of numpy scalars)
    safe_globals=(argparse.Namespace, *_numpy_scalar_globals()),
    description="Confusezius/ICCV2019_MIC checkpoint_Class.pth.tar: {'state_dict', 'opt', 'progress'}",
)

_PAPER = (
    "Roth, Brattoli and Ommer, MIC: Mining Interclass Characteristics for Improved Metric Learning, ICCV 2019"
)


def _mic(arch: str, overrides: dict[str, Any]) -> MIC:
    return MIC(trunk_from_overrides(arch, overrides), **overrides)


@register_model(
    pretrained=PretrainedCfg(
        **IMAGENET_INPUT,
        descriptor="128-d class embedding (plus a 128-d shared embedding) on ResNet50",
        license="GPL-3.0 (official code)",
        paper=_PAPER,
        notes="The authors released no weights; load checkpoint_Class.pth.tar from a run of the official code. "
        "Evaluation: Resize 256, CenterCrop 224.",
    ),
    formats=[MIC_OFFICIAL],
)
def mic_resnet50(**overrides: Any) -> MIC:
    """MIC on ResNet50: frozen BatchNorm statistics (affine trained), 128-d class and shared heads.

    ``weights="IMAGENET1K_V1"`` starts the trunk from torchvision's ImageNet weights (the paper starts from the
    same weights, as packaged by Cadene's ``pretrainedmodels``).
    """
    return _mic("resnet50", overrides)


@register_model(formats=[MIC_OFFICIAL])
def mic_resnet10(**overrides: Any) -> MIC:
    """A tiny MIC (BasicBlock ResNet with one block per stage, 64-d heads) for tests and demos."""
    return _mic("resnet10", {"class_dim": 64, "shared_dim": 64, **overrides})
