"""Data for set embeddings: folder-per-object datasets, set selection, padding, multi-crop views."""

from objretrieval.data.image_sets import (
    IMAGE_EXTENSIONS,
    ImageSet,
    ImageSetBatch,
    ImageSetDataset,
    MultiCropSetBatch,
    SetSelection,
    collate_image_sets,
    collate_multicrop_sets,
    folder_class_index,
    pad_sets,
)
from objretrieval.data.transforms import DINOMultiCrop, set_eval_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DINOMultiCrop",
    "ImageSet",
    "ImageSetBatch",
    "ImageSetDataset",
    "MultiCropSetBatch",
    "SetSelection",
    "collate_image_sets",
    "collate_multicrop_sets",
    "folder_class_index",
    "pad_sets",
    "set_eval_transform",
]
