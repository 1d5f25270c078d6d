"""Local-descriptor extraction for AMES: DINOv2 ViT-B/14 with registers (timm) and CVNet's ResNet-101 (torchvision).

Both turn an image into AMES's rows (:mod:`objretrieval.descriptors.local`): backbone feature map per scale,
optional :class:`~objretrieval.descriptors.SpatialAttention2d` detector (else weights are the descriptor
norms), the ``topk`` strongest descriptors jointly over scales, plus a global descriptor.

Differences from the official extraction, which uses OpenCV: images are resized with PyTorch (area
interpolation to shrink, bilinear to enlarge, as the official INTER_AREA / INTER_LINEAR choice), so pixels
may differ slightly from an OpenCV pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from objretrieval.descriptors.detector import SpatialAttention2d
from objretrieval.descriptors.local import (
    ScaleFeatures,
    global_descriptor,
    patch_locations,
    receptive_field_centres,
    select_top,
)
from objretrieval.display import ConfigRepr
from objretrieval.models.cvnet import CVNetBackbone


class Extracted(NamedTuple):
    """What an extractor returns for one image.

    Attributes:
        rows: (topk, 5 + D) local descriptor rows: location, scale index, padding flag, weight, descriptor.
        global_descriptor: (D_g,) L2-normalised global descriptor.
        cls: (D,) L2-normalised class token (ViT backbones), else None.
    """

    rows: Tensor
    global_descriptor: Tensor
    cls: Tensor | None


def _as_image(image: Any) -> Tensor:
    """A (3, H, W) float image in [0, 1] from a tensor (float in [0, 1] or uint8) or a PIL image."""
    if not isinstance(image, Tensor):
        from torchvision.transforms.functional import pil_to_tensor

        image = pil_to_tensor(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) RGB, got shape {tuple(image.shape)}")
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def crop(image: Tensor, box: Sequence[float]) -> Tensor:
    """Crop a (3, H, W) image to ``(x1, y1, x2, y2)`` (revisited Oxford/Paris query boxes), truncating to ints."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return image[:, y1:y2, x1:x2]


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) -> (C, h, w): area interpolation along shrinking, bilinear along enlarging axes."""
    h, w = size
    if (h, w) == tuple(image.shape[1:]):
        return image
    x = image[None]
    if h < x.shape[2] or w < x.shape[3]:  # shrink first (area), then enlarge what remains (bilinear)
        x = F.interpolate(x, size=(min(h, x.shape[2]), min(w, x.shape[3])), mode="area")
    if h > x.shape[2] or w > x.shape[3]:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[0]


def _normalise(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class DINOv2LocalExtractor(ConfigRepr, nn.Module):
    """AMES's DINOv2 extraction: final-norm patch tokens of a ViT with registers, at native resolution.

    Each image side is resized to the nearest multiple of the patch size (after ``scale``), patch tokens
    (class and register tokens removed) form the feature map, locations are patch centres relative to the
    image size.

    Args:
        backbone: a timm model name (default ``vit_base_patch14_reg4_dinov2``, built with dynamic image
            size) or an already built timm ViT.
        pretrained: load timm's pretrained weights (``.lvd142m``; downloads through the Hugging Face hub).
        detector: optional detector head; without one the weights are the token norms.
        topk: descriptors kept per image (700 in AMES).
        scales: image scales (AMES uses one, 1.0).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "vit_base_patch14_reg4_dinov2",
        *,
        pretrained: bool = False,
        detector: SpatialAttention2d | None = None,
        topk: int = 700,
        scales: Sequence[float] = (1.0,),
    ) -> None:
        super().__init__()
        self.pretrained = pretrained
        if isinstance(backbone, str):
            import timm

            backbone = timm.create_model(backbone, pretrained=pretrained, dynamic_img_size=True)
        self.backbone: Any = backbone.eval()  # a timm ViT: forward_features, patch_embed, num_prefix_tokens
        self.detector = detector.eval() if detector is not None else None
        vit: Any = backbone
        self.patch = int(vit.patch_embed.patch_size[0])
        self.prefix = int(vit.num_prefix_tokens)
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.topk, self.scales = topk, tuple(scales)

    def snapped_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """Each side times ``scale``, rounded to a multiple of the patch size (at least one patch)."""
        return tuple(max(round(side * scale / self.patch), 1) * self.patch for side in (height, width))  # type: ignore[return-value]

    @torch.no_grad()
    def forward(self, image: Any, box: Sequence[float] | None = None) -> Extracted:
        """Rows, global descriptor and class token of one image (cropped to ``box`` first, if given)."""
        image = _as_image(image)
        if box is not None:
            image = crop(image, box)
        device = next(self.backbone.parameters()).device
        scales, classes = [], []
        for scale in self.scales:
            h, w = self.snapped_size(image.shape[1], image.shape[2], scale)
            x = _normalise(resize(image, (h, w)), self.mean, self.std)[None].to(device)
            tokens = self.backbone.forward_features(x)[0]
            classes.append(F.normalize(tokens[0], dim=0))
            patches = tokens[self.prefix :]
            grid = (h // self.patch, w // self.patch)
            if self.detector is not None:
                descriptors, weights = self.detector.describe(patches.T.reshape(-1, *grid))
            else:
                descriptors, weights = patches, patches.norm(dim=1)
            scales.append(
                ScaleFeatures(descriptors.cpu(), weights.cpu(), patch_locations(grid, (h, w), self.patch))
            )
        cls = F.normalize(torch.stack(classes).mean(0), dim=0).cpu()
        return Extracted(select_top(scales, self.topk), global_descriptor(scales), cls)


class CVNetLocalExtractor(ConfigRepr, nn.Module):
    """AMES's CVNet extraction: res4 maps at three scales, joint top-k, receptive-field centres.

    Images are fed in BGR order with BGR ImageNet statistics (the pycls convention CVNet was trained with).

    Args:
        backbone: a :class:`~objretrieval.models.cvnet.CVNetBackbone`, e.g.
            ``create_model("cvnet_resnet101", checkpoint="CVPR2022_CVNet_R101.pyth")``.
        detector: optional detector head; without one the weights are the channel norms.
        topk: descriptors kept per image.
        scales: image scales (0.7071, 1, 1.4142 in AMES).
    """

    MEAN_BGR, STD_BGR = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)

    def __init__(
        self,
        backbone: CVNetBackbone,
        *,
        detector: SpatialAttention2d | None = None,
        topk: int = 700,
        scales: Sequence[float] = (0.7071, 1.0, 1.4142),
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.detector = detector.eval() if detector is not None else None
        self.topk, self.scales = topk, tuple(scales)

    @torch.no_grad()
    def forward(self, image: Any, box: Sequence[float] | None = None) -> Extracted:
        image = _as_image(image)
        if box is not None:
            image = crop(image, box)
        bgr = image.flip(0)
        device = next(self.backbone.parameters()).device
        scales, globals_ = [], []
        for scale in self.scales:
            size = (max(round(image.shape[1] * scale), 1), max(round(image.shape[2] * scale), 1))
            x = _normalise(resize(bgr, size), self.MEAN_BGR, self.STD_BGR)[None].to(device)
            local, global_ = self.backbone.features(x)
            feature_map = local[0]
            globals_.append(F.normalize(global_[0], dim=0))
            if self.detector is not None:
                descriptors, weights = self.detector.describe(feature_map)
            else:
                descriptors = feature_map.flatten(1).T
                weights = descriptors.norm(dim=1)
            grid = (feature_map.shape[1], feature_map.shape[2])
            scales.append(
                ScaleFeatures(descriptors.cpu(), weights.cpu(), receptive_field_centres(grid, scale))
            )
        return Extracted(
            select_top(scales, self.topk), F.normalize(torch.stack(globals_).mean(0), dim=0).cpu(), None
        )
