"""extract_to_store: a collection of images into a descriptor file, with both extractors."""

from __future__ import annotations

import pytest
import torch

from objretrieval.descriptors import (
    HEADER,
    CVNetLocalExtractor,
    DescriptorStore,
    DINOv2LocalExtractor,
    extract_to_store,
)
from objretrieval.models import CVNetBackbone
from tests.tiny_models import tiny_dinov2_vit


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.fixture(scope="module")
def dinov2() -> DINOv2LocalExtractor:
    return DINOv2LocalExtractor(tiny_dinov2_vit(), topk=12)


def _assert_matches_per_image_calls(extractor, images, boxes, path, global_descriptors) -> None:
    """The file's rows and the returned globals are the extractor's output for each image, in order."""
    expected = [extractor(image, box=None if boxes is None else boxes[i]) for i, image in enumerate(images)]
    with DescriptorStore(path) as store:
        assert len(store) == len(images)
        rows = store.read_rows(range(len(images)))
    torch.testing.assert_close(rows, torch.stack([e.rows for e in expected]))
    torch.testing.assert_close(global_descriptors, torch.stack([e.global_descriptor for e in expected]))


def test_dinov2_file_holds_each_images_rows_and_boxes_crop(dinov2, tmp_path) -> None:
    images = _images([(42, 56), (56, 42), (28, 70)])
    boxes = [(0, 0, 28, 28), None, (14, 0, 70, 28)]  # one image left whole
    path = tmp_path / "local.h5"
    global_descriptors = extract_to_store(dinov2, images, path, boxes=boxes)
    assert global_descriptors.shape == (3, 32)
    with DescriptorStore(path) as store:
        assert (store.topk, store.dim) == (12, 32)
    _assert_matches_per_image_calls(dinov2, images, boxes, path, global_descriptors)
    # the boxes were used: the first image's crop has 2 x 2 patches (4 real rows), the whole image 3 x 4
    with DescriptorStore(path) as store:
        _, padding = store.read([0, 1])
    assert (~padding).sum(1).tolist() == [4, 12]


def test_cvnet_file_holds_its_1024_d_res4_rows(tmp_path) -> None:
    torch.manual_seed(0)
    extractor = CVNetLocalExtractor(CVNetBackbone().eval(), topk=20, scales=(1.0,))
    images = _images([(32, 48), (48, 32)], seed=1)
    path = tmp_path / "cvnet.h5"
    global_descriptors = extract_to_store(extractor, images, path)
    with DescriptorStore(path) as store:
        assert (store.topk, store.dim) == (20, 1024)  # res4 channels, not the 2048-d global head
    assert global_descriptors.shape == (2, 2048)
    _assert_matches_per_image_calls(extractor, images, None, path, global_descriptors)


def test_an_existing_file_is_replaced(dinov2, tmp_path) -> None:
    path = tmp_path / "local.h5"
    DescriptorStore.create(path, 5, 3, 7).close()
    extract_to_store(dinov2, _images([(28, 28)]), path)
    with DescriptorStore(path) as store:
        assert (len(store), store.topk, store.features.shape[2]) == (1, 12, HEADER + 32)


def test_errors(dinov2, tmp_path) -> None:
    path = tmp_path / "local.h5"
    with pytest.raises(ValueError, match="at least one image"):
        extract_to_store(dinov2, [], path)
    with pytest.raises(ValueError, match=r"one box \(or None\) per image: 1 boxes, 2 images"):
        extract_to_store(dinov2, _images([(28, 28), (28, 28)]), path, boxes=[(0, 0, 14, 14)])
    with pytest.raises(TypeError, match="images must be a sequence"):
        extract_to_store(dinov2, (image for image in _images([(28, 28)])), path)
    with pytest.raises(TypeError, match="boxes must be a sequence"):
        extract_to_store(dinov2, _images([(28, 28)]), path, boxes=(b for b in [None]))
    with pytest.raises(TypeError, match="progress"):
        extract_to_store(dinov2, _images([(28, 28)]), path, progress="yes")  # type: ignore[arg-type]
    assert not path.exists()  # bad arguments are refused before any file is written
