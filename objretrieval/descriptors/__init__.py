"""Local descriptors: extraction, selection into AMES's row layout, the detector head, binary codes, storage."""

from objretrieval.descriptors.binary import pack_bits, signs_from_bits, unpack_bits
from objretrieval.descriptors.detector import SpatialAttention2d
from objretrieval.descriptors.extract import extract_to_store
from objretrieval.descriptors.extractors import (
    CVNetLocalExtractor,
    DINOv2LocalExtractor,
    Extracted,
    crop,
    resize,
)
from objretrieval.descriptors.local import (
    HEADER,
    ScaleFeatures,
    global_descriptor,
    patch_locations,
    receptive_field_centres,
    select_top,
    split_rows,
)
from objretrieval.descriptors.store import BinaryCodeStore, DescriptorStore

__all__ = [
    "HEADER",
    "BinaryCodeStore",
    "CVNetLocalExtractor",
    "DINOv2LocalExtractor",
    "DescriptorStore",
    "Extracted",
    "ScaleFeatures",
    "SpatialAttention2d",
    "crop",
    "extract_to_store",
    "global_descriptor",
    "pack_bits",
    "patch_locations",
    "receptive_field_centres",
    "resize",
    "select_top",
    "signs_from_bits",
    "split_rows",
    "unpack_bits",
]
