"""Image-set data: folder-name labels, set selection, padding, multi-crop batches, dataset preparation."""

from __future__ import annotations

import csv
import importlib.util
import lzma
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from objretrieval.data import (
    DINOMultiCrop,
    ImageSetDataset,
    SetSelection,
    collate_image_sets,
    collate_multicrop_sets,
    folder_class_index,
    pad_sets,
    set_eval_transform,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_images(root: Path, objects: dict[str, int], size: int = 40) -> None:
    for name, count in objects.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mode = "L" if i == 0 else "RGB"  # a grayscale image is converted, not dropped
            Image.new(mode, (size, size + i), color=10 * i).save(root / name / f"img{i}.png")


def test_labels_come_from_folder_names_across_splits(tmp_path: Path) -> None:
    write_images(tmp_path / "query", {"chair": 2, "table": 1})
    write_images(tmp_path / "target", {"table": 3, "lamp": 2, "chair": 1})
    names = folder_class_index(tmp_path / "query", tmp_path / "target")
    assert names == {"chair": 0, "lamp": 1, "table": 2}
    query = ImageSetDataset(tmp_path / "query", class_to_idx=names)
    target = ImageSetDataset(tmp_path / "target", class_to_idx=names)
    assert query.labels.tolist() == [0, 2] and target.labels.tolist() == [0, 1, 2]
    assert query.labels.dtype == torch.int64
    assert query[0].name == "chair" and all(img.mode == "RGB" for img in query[0].images)
    with pytest.raises(KeyError, match="lamp"):
        ImageSetDataset(tmp_path / "target", class_to_idx={"chair": 0, "table": 1})
    (tmp_path / "query" / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        ImageSetDataset(tmp_path / "query")


def test_set_selection_modes() -> None:
    files = [f"/x/{n}.jpg" for n in ("c", "a", "e", "b", "d")]
    assert SetSelection(3, "first", reverse=False)(files, 0) == ["/x/a.jpg", "/x/b.jpg", "/x/c.jpg"]
    assert SetSelection(3, "first")(files, 0) == ["/x/c.jpg", "/x/b.jpg", "/x/a.jpg"]  # MILE reverses
    random = SetSelection(3, "random", seed=1)
    draw = random(files, 4, epoch=0)
    assert len(set(draw)) == 3 and draw == random(files, 4, epoch=0)  # a function of (seed, epoch, index)
    assert any(random(files, 4, epoch=e) != draw for e in range(1, 6))
    padded = SetSelection(4, "first", pad="duplicate")(files[:2], 0)
    assert len(padded) == 4 and set(padded) <= set(files[:2])
    assert SetSelection(4, "first", pad="none")(files[:2], 0) == ["/x/c.jpg", "/x/a.jpg"]
    assert len(SetSelection(2, "all")(files, 0)) == 5
    with pytest.raises(ValueError, match="mode"):
        SetSelection(2, "best")
    with pytest.raises(ValueError, match="images_per_set"):
        SetSelection(0)


def test_collate_pads_short_sets_with_a_mask(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 1, "b": 3})
    ds = ImageSetDataset(tmp_path, SetSelection(4, "first", pad="none"), set_eval_transform(28))
    batch = collate_image_sets([ds[0], ds[1]])
    assert batch.images.shape == (2, 3, 3, 28, 28)
    assert batch.mask is not None and batch.mask.tolist() == [[False, True, True], [False, False, False]]
    assert batch.labels.tolist() == [0, 1]
    full, mask = pad_sets([torch.ones(2, 4), torch.ones(2, 4)])
    assert mask is None and full.shape == (2, 2, 4)
    with pytest.raises(ValueError, match="items of shape"):
        pad_sets([torch.ones(2, 4), torch.ones(2, 5)])


def test_multicrop_batches(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 2, "b": 3}, size=64)
    crops = DINOMultiCrop(56, 28, 3)
    ds = ImageSetDataset(tmp_path, SetSelection(3, "first", pad="none"), crops)
    batch, labels = collate_multicrop_sets([ds[0], ds[1]])
    assert batch.global_crops.shape == (2, 3, 2, 3, 56, 56)
    assert batch.local_crops is not None and batch.local_crops.shape == (2, 3, 3, 3, 28, 28)
    assert batch.mask is not None and batch.mask.tolist() == [[False, False, True], [False, False, False]]
    assert labels.tolist() == [0, 1]


def test_multicrop_without_photometric_augmentation_keeps_the_colours() -> None:
    """A flat-coloured image stays that colour through every crop and flip; DINO's jitter/grayscale change it."""
    torch.manual_seed(0)
    image = Image.new("RGB", (64, 64), color=(200, 30, 90))
    expected = set_eval_transform(8)(image)[:, 0, 0]  # the normalised colour
    plain_global, plain_local = DINOMultiCrop(28, 14, 2, photometric=False)(image)
    for crop in [*plain_global, *plain_local]:
        torch.testing.assert_close(crop, expected[:, None, None].expand_as(crop), rtol=0, atol=1e-5)
    jittered = [c for _ in range(10) for c in DINOMultiCrop(28, 14, 2)(image)[0]]
    assert max(float((c - expected[:, None, None]).abs().max()) for c in jittered) > 0.1


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_prepare_abo_from_the_benchmark_csv(tmp_path: Path) -> None:
    images, renders = tmp_path / "images" / "small", tmp_path / "abo-benchmark-material"
    rows = [
        ("test-query", "catalog", "ab/cat1.jpg", "B01"),
        ("test-target", "render", "B01/render/0.jpg", "B01"),
        ("test-target", "catalog", "cd/cat2.jpg", "B02"),
        ("train", "catalog", "ef/cat3.jpg", "B03"),
        ("test-query", "catalog", "zz/missing.jpg", "B04"),
    ]
    for _split, kind, path, _ in rows[:4]:
        src = renders.joinpath(*path.split("/")[1:]) if kind == "render" else images / path
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(path.encode())
    csv_path = tmp_path / "abo-mvr.csv.xz"
    with lzma.open(csv_path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "image_type", "split_set", "class_id"])
        writer.writerows([(p, k, s, c) for s, k, p, c in rows])
    counts = _load_script("prepare_abo").prepare(csv_path, images, renders, tmp_path / "out")
    assert counts == {"test-query": 1, "test-target": 2}
    assert (tmp_path / "out" / "test.query" / "B01" / "cat1.jpg").read_bytes() == b"ab/cat1.jpg"
    assert (tmp_path / "out" / "test.target" / "B01" / "0.jpg").read_bytes() == b"B01/render/0.jpg"
    assert (tmp_path / "out" / "test.target" / "B02" / "cat2.jpg").is_file()
    assert not (tmp_path / "out" / "train").exists()


def test_prepare_inat_is_seeded_and_sorted(tmp_path: Path) -> None:
    root = tmp_path / "train_val_images"
    for sup, species in {"Aves": ["Parus major", "Pica pica", "Corvus corax"], "Fungi": ["Amanita"]}.items():
        for sp in species:
            (root / sup / sp).mkdir(parents=True)
            for i in range(5):
                (root / sup / sp / f"{i}.jpg").write_bytes(b"x")
    prepare = _load_script("prepare_inat").prepare
    counts = prepare(root, tmp_path / "a", species=2, seed=3)
    prepare(root, tmp_path / "b", species=2, seed=3)
    chosen = sorted(p.name for p in (tmp_path / "a" / "query").iterdir())
    assert chosen == sorted(p.name for p in (tmp_path / "b" / "query").iterdir())  # reproducible
    assert len(chosen) == 3 and "Fungi_Amanita" in chosen
    assert counts == {"query": 9, "target": 6}  # 5 images: 0..2 (index <= 5 // 2) to query, 3..4 to target
    first = next(p for p in (tmp_path / "a" / "query").iterdir() if p.name != "Fungi_Amanita")
    assert sorted(f.name for f in first.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
