"""Image transforms for set embeddings: MILE's evaluation resize and DINO's multi-crop augmentation."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torchvision import transforms as T

from objretrieval.display import ConfigRepr

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def set_eval_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """MILE's evaluation preprocessing: resize to ``size`` x ``size`` (no aspect ratio, bilinear, no crop)."""
    return T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)])


class _PILGaussianBlur:
    """DINO's blur: with probability ``p``, PIL Gaussian blur of a radius drawn in [0.1, 2]."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Any) -> Any:
        from PIL import ImageFilter

        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class DINOMultiCrop(ConfigRepr):
    """DINO's multi-crop augmentation of one PIL image into global and local crops.

    Two global crops (``RandomResizedCrop(global_size, scale=global_scale, bicubic)``, flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale with p 0.2; blur with p 1.0 on the first, blur with p 0.1 and
    solarisation with p 0.2 on the second) and ``n_local`` local crops (``local_size``, ``local_scale``, blur
    with p 0.5), all normalised. MILE uses 224/98 px for patch-14 backbones and 8 local crops.
    ``photometric=False`` keeps only the crops and flips, for images whose colours are what identifies them
    (jitter and grayscale would teach the model to ignore exactly that).

    Returns ``(global_crops, local_crops)``: lists of (3, H, W) tensors.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        n_local: int = 8,
        *,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        photometric: bool = True,
    ) -> None:
        bicubic = T.InterpolationMode.BICUBIC
        flip: list[Any] = [T.RandomHorizontalFlip(p=0.5)]
        jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        normalize = [T.ToTensor(), T.Normalize(mean, std)]

        def view(crop: Any, *photo: Any) -> T.Compose:
            return T.Compose([crop, *flip, *((*jitter, *photo) if photometric else ()), *normalize])

        crop = T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic)
        self.global_1 = view(crop, _PILGaussianBlur(1.0))
        self.global_2 = view(crop, _PILGaussianBlur(0.1), T.RandomSolarize(128, p=0.2))
        local_crop = T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic)
        self.local = view(local_crop, _PILGaussianBlur(0.5))
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = global_scale, local_scale
        self.mean, self.std, self.photometric = mean, std, photometric

    def __call__(self, image: Any) -> tuple[list[Tensor], list[Tensor]]:
        return [self.global_1(image), self.global_2(image)], [self.local(image) for _ in range(self.n_local)]
