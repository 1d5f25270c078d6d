"""Local descriptors: binary packing, the h5py stores, DINOv2 (timm) and CVNet (torchvision) extraction."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from objretrieval import create_model
from objretrieval.descriptors import (
    HEADER,
    BinaryCodeStore,
    CVNetLocalExtractor,
    DescriptorStore,
    DINOv2LocalExtractor,
    SpatialAttention2d,
    pack_bits,
    resize,
    signs_from_bits,
    unpack_bits,
)
from objretrieval.models import CVNetBackbone
from tests.tiny_models import tiny_dinov2_vit

# -- binary codes ---------------------------------------------------------------------------------------------


def test_pack_bits_matches_numpy_packbits() -> None:
    bits = torch.rand(3, 7, 128, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 7, 16)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1))
    assert torch.equal(unpack_bits(packed), bits)
    signs = signs_from_bits(packed)
    assert torch.equal(signs, bits.float() * 2 - 1)


def test_pack_bits_of_no_rows_keeps_the_layout() -> None:
    # a block of no images, as a rank without blocks projects
    packed = pack_bits(torch.zeros(0, 5, 16, dtype=torch.bool))
    assert packed.shape == (0, 5, 2) and packed.dtype == torch.uint8
    assert unpack_bits(packed).shape == (0, 5, 16)


def test_models_never_import_descriptors() -> None:
    """The model package owns what its models need (bit packing); descriptors build on models, not back."""
    import subprocess
    import sys

    code = "import sys, objretrieval.models; assert 'objretrieval.descriptors' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pack_bits_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.ones(4, 12, dtype=torch.bool))
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.ones(4, 2, dtype=torch.int32))


# -- stores -----------------------------------------------------------------------------------------------------


def _rows(n: int, topk: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, topk, HEADER + dim, generator=g)
    rows[:, :, 3] = 0.0
    rows[:, topk - 2 :, :] = 0.0  # the last two rows of every image are padding
    rows[:, topk - 2 :, 3] = 1.0
    return rows


@pytest.mark.parametrize("options", [{}, {"compression": "gzip"}, {"chunked": False}])
def test_descriptor_store_round_trip(tmp_path, options) -> None:
    rows = _rows(6, 9, 4)
    path = tmp_path / "db.h5"
    with DescriptorStore.create(path, 6, 9, 4, **options) as store:
        store.write(0, rows[:4])
        store.write(4, rows[4:].numpy())
    with h5py.File(path, "r") as f:  # the official layout: one 'features' dataset (N, topk, 5 + D)
        assert list(f) == ["features"] and f["features"].shape == (6, 9, 9)
        assert f["features"].compression == options.get("compression")
        assert (f["features"].chunks is None) == (options.get("chunked") is False)
    with DescriptorStore(path) as store:
        assert (len(store), store.topk, store.dim) == (6, 9, 4)
        ids = [5, 1, 3, 1]  # unsorted, repeated
        assert torch.equal(store.read_rows(ids), rows[ids])
        descriptors, padding = store.read(np.array(ids), max_descriptors=8)
        assert torch.equal(descriptors, rows[ids, :8, HEADER:])
        assert padding.dtype == torch.bool and padding[:, :7].sum() == 0 and padding[:, 7].all()
        starts, seen = [], []
        for start, desc, pad in store.blocks(block_size=4, max_descriptors=3):
            starts.append(start)
            seen.append(desc)
            assert pad.shape == desc.shape[:2]
        assert starts == [0, 4] and torch.equal(torch.cat(seen), rows[:, :3, HEADER:])


def test_descriptor_store_reads_an_official_file(tmp_path) -> None:
    rows = _rows(3, 5, 6).numpy()
    path = tmp_path / "official.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=rows)
    with DescriptorStore(path) as store:
        assert torch.equal(store.read_rows([2, 0]), torch.from_numpy(rows[[2, 0]]))


def test_descriptor_store_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="chunked"):
        DescriptorStore.create(tmp_path / "x.h5", 2, 3, 4, chunked=False, compression="gzip")
    store = DescriptorStore.create(tmp_path / "y.h5", 2, 3, 4)
    with pytest.raises(ValueError, match=r"rows must have shape \(n, 3, 9\)"):
        store.write(0, torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match=r"images 1 \.\. 3 do not fit in a store of 2"):
        store.write(1, torch.zeros(2, 3, 9))
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 2\)"):
        store.read_rows([0, 2])
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 2\), got min -1"):
        store.read([-1])  # not "the last image"
    with pytest.raises(TypeError, match="indices must be integer image ids, got dtype float64"):
        store.read([0.5])  # not image 0
    with pytest.raises(TypeError, match="indices must be integer image ids, got dtype bool"):
        store.read(np.array([True, False]))
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=f"max_descriptors must be >= 1, got {bad}"):
            store.read([0], max_descriptors=bad)
        with pytest.raises(ValueError, match="max_descriptors must be >= 1"):
            next(store.blocks(1, max_descriptors=bad))
    assert store.read(torch.tensor([1, 0]))[0].shape == (2, 3, 4)  # tensors of ids work too
    store.close()
    with h5py.File(tmp_path / "z.h5", "w") as f:
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(KeyError, match="features"):
        DescriptorStore(tmp_path / "z.h5")


def test_binary_code_store(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (5, 50, 16), generator=g, dtype=torch.uint8)
    padding = torch.rand(5, 50, generator=g) > 0.8
    with BinaryCodeStore.create(tmp_path / "codes.h5", 5, 50) as store:
        store.write(0, codes, padding)
        assert store.bytes_per_image == 800
    with BinaryCodeStore(tmp_path / "codes.h5") as store:
        got_codes, got_padding = store.read([4, 0, 2])
        assert torch.equal(got_codes, codes[[4, 0, 2]]) and torch.equal(got_padding, padding[[4, 0, 2]])
    with pytest.raises(ValueError, match="multiple of 8"):
        BinaryCodeStore.create(tmp_path / "bad.h5", 1, 2, bits=12)
    with pytest.raises(KeyError, match="codes"):
        BinaryCodeStore(_plain_file(tmp_path))


def _plain_file(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((1, 2, 6), np.float32))
    return path


def test_resize_uses_area_to_shrink_and_bilinear_to_enlarge() -> None:
    image = _image(30, 40)
    shrunk = F.interpolate(image[None], size=(15, 20), mode="area")[0]
    enlarged = F.interpolate(image[None], size=(45, 60), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(resize(image, (15, 20)), shrunk)
    torch.testing.assert_close(resize(image, (45, 60)), enlarged)
    mixed = resize(image, (45, 20))  # taller (bilinear along rows) and narrower (area along columns)
    expected = F.interpolate(
        F.interpolate(image[None], size=(30, 20), mode="area"), size=(45, 20), mode="bilinear"
    )
    torch.testing.assert_close(mixed, expected[0])
    assert resize(image, (30, 40)) is image


# -- DINOv2 extraction -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    """A two-block DINOv2-style ViT with registers (random weights), as timm builds it."""
    return tiny_dinov2_vit(embed_dim=48, depth=2)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_dinov2_rows_are_the_patch_tokens(tiny_vit) -> None:
    extractor = DINOv2LocalExtractor(tiny_vit, topk=1000)
    assert extractor.snapped_size(50, 75, 1.0) == (56, 70)  # nearest multiples of 14
    assert extractor.snapped_size(50, 75, 0.5) == (28, 42) and extractor.snapped_size(5, 5, 1.0) == (14, 14)
    image = _image(56, 70)
    rows, global_descriptor, cls = extractor(image)
    # the ViT on the normalised image, independently of the extractor
    x = image[None]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    tokens = tiny_vit.forward_features((x - mean[:, None, None]) / std[:, None, None])[0]
    patches = tokens[1 + 4 :]  # class token and 4 registers excluded
    assert patches.shape == (4 * 5, 48)
    real = rows[:, 3] == 0
    assert real.sum() == 20 and rows.shape == (1000, HEADER + 48)
    descriptors, weights = rows[real, HEADER:], rows[real, 4]
    assert torch.all(weights[:-1] >= weights[1:])  # sorted by weight
    order = patches.norm(dim=1).argsort(descending=True)
    torch.testing.assert_close(descriptors, patches[order], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weights, patches.norm(dim=1)[order], atol=1e-4, rtol=1e-4)
    # locations: patch centres relative to the resized image, row-major over the 4 x 5 grid
    r, c = order // 5, order % 5
    torch.testing.assert_close(rows[real, 0], (r * 14 + 7) / 56)
    torch.testing.assert_close(rows[real, 1], (c * 14 + 7) / 70)
    assert (
        torch.all(rows[~real, :3] == 0) and torch.all(rows[~real, 4:] == 0) and torch.all(rows[~real, 3] == 1)
    )
    torch.testing.assert_close(cls, F.normalize(tokens[0], dim=0), atol=1e-5, rtol=1e-5)
    assert global_descriptor.shape == (48,) and abs(float(global_descriptor.norm()) - 1) < 1e-5


def test_dinov2_topk_crop_and_input_types(tiny_vit) -> None:
    extractor = DINOv2LocalExtractor(tiny_vit, topk=7)
    image = _image(84, 98, seed=3)
    rows = extractor(image).rows
    assert rows.shape == (7, HEADER + 48) and torch.all(rows[:, 3] == 0)
    as_uint8 = (image * 255).round().to(torch.uint8)
    np.testing.assert_allclose(
        extractor(as_uint8).rows.numpy(), extractor(as_uint8.float() / 255).rows.numpy(), atol=1e-6
    )
    box = (14, 28, 70, 84)  # x1, y1, x2, y2
    torch.testing.assert_close(extractor(image, box=box).rows, extractor(image[:, 28:84, 14:70]).rows)
    from PIL import Image

    pil = Image.fromarray(as_uint8.permute(1, 2, 0).numpy())
    torch.testing.assert_close(extractor(pil).rows, extractor(as_uint8).rows)
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\)"):
        extractor(torch.rand(1, 28, 28))


def test_dinov2_detector_weights_rows(tiny_vit) -> None:
    torch.manual_seed(0)
    detector = SpatialAttention2d(48)
    extractor = DINOv2LocalExtractor(tiny_vit, detector=detector, topk=50)
    rows = extractor(_image(42, 42)).rows
    real = rows[:, 3] == 0
    assert real.sum() == 9
    torch.testing.assert_close(
        rows[real, HEADER:].norm(dim=1), torch.ones(9)
    )  # detector output is normalised
    assert torch.all(rows[real, 4] > 0)  # softplus weights


# -- CVNet --------------------------------------------------------------------------------------------------------

_PYCLS = {
    "conv1": "f.a",
    "bn1": "f.a_bn",
    "conv2": "f.b",
    "bn2": "f.b_bn",
    "conv3": "f.c",
    "bn3": "f.c_bn",
    "downsample.0": "proj",
    "downsample.1": "bn",
}


def _pycls_name(key: str) -> str:
    """A torchvision ResNet key written as CVNet's pycls ResNet names it."""
    if key.startswith("conv1."):
        return "stem.conv." + key.removeprefix("conv1.")
    if key.startswith("bn1."):
        return "stem.bn." + key.removeprefix("bn1.")
    if key.startswith(("pool.", "fc.")):
        return "head." + key
    layer, block, rest = key.split(".", 2)
    module, param = rest.rsplit(".", 1)
    return f"s{layer[-1]}.b{int(block) + 1}.{_PYCLS[module]}.{param}"


@pytest.fixture(scope="module")
def cvnet() -> CVNetBackbone:
    torch.manual_seed(0)
    model = CVNetBackbone()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_cvnet_official_checkpoint_loads(cvnet, tmp_path) -> None:
    state = {f"encoder_q.{_pycls_name(k)}": v for k, v in cvnet.state_dict().items()}
    state.update({f"encoder_k.{_pycls_name(k)}": torch.zeros_like(v) for k, v in cvnet.state_dict().items()})
    path = tmp_path / "CVPR2022_CVNet_R101.pyth"
    torch.save({"epoch": 1, "model_state": state}, path)
    loaded = create_model("cvnet_resnet101", checkpoint=str(path)).eval()
    for key, value in cvnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cvnet(x))


def test_cvnet_res4_is_pre_activation(cvnet) -> None:
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        res4, global_descriptor = cvnet.features(x)
        trunk = cvnet.layer3(cvnet.layer2(cvnet.layer1(cvnet.maxpool(cvnet.relu(cvnet.bn1(cvnet.conv1(x)))))))
    assert res4.shape == (2, 1024, 4, 5) and (res4 < 0).any()
    torch.testing.assert_close(F.relu(res4), trunk)
    torch.testing.assert_close(cvnet.local_features(x), res4)
    torch.testing.assert_close(global_descriptor, cvnet.fc(cvnet.pool(cvnet.layer4(trunk))))


def test_cvnet_multiscale_extraction(cvnet) -> None:
    extractor = CVNetLocalExtractor(cvnet, topk=200)
    image = _image(64, 96, seed=5)
    rows, global_descriptor, cls = extractor(image)
    assert cls is None and global_descriptor.shape == (2048,)
    real = rows[:, 3] == 0
    # res4 grids at scales 0.7071, 1, 1.4142 of 64 x 96: 3 x 5, 4 x 6, 6 x 9 positions
    assert int(real.sum()) == 15 + 24 + 54
    scales = rows[real, 2]
    assert set(scales.tolist()) == {0.0, 1.0, 2.0} and int((scales == 1).sum()) == 24
    assert torch.all(rows[real, 4][:-1] >= rows[real, 4][1:])
    # at scale 1 the res4 map of the BGR image is what the rows hold, with centres 16 * (r, c)
    mean, std = torch.tensor([0.406, 0.456, 0.485]), torch.tensor([0.225, 0.224, 0.229])
    with torch.no_grad():
        res4 = cvnet.local_features(((image.flip(0) - mean[:, None, None]) / std[:, None, None])[None])[0]
    at_one = rows[real][scales == 1]
    flat = res4.flatten(1).T
    ids = (at_one[:, 0] / 16 * 6 + at_one[:, 1] / 16).round().long()
    torch.testing.assert_close(at_one[:, HEADER:], flat[ids], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(at_one[:, 4], flat[ids].norm(dim=1), atol=1e-4, rtol=1e-4)
