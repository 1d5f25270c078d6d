"""Prepare ABO's multi-view retrieval benchmark (Collins et al., CVPR 2022) as MILE evaluates it.

From the files you downloaded from https://amazon-berkeley-objects.s3.amazonaws.com (``benchmarks/abo-mvr.csv.xz``,
``archives/abo-images-small.tar`` and ``archives/abo-benchmark-material.tar``, extracted), writes

    <out>/test.query/<class_id>/<image>     and     <out>/test.target/<class_id>/<image>

for the rows whose ``split_set`` is ``test-query`` / ``test-target``. Rendered views (``image_type ==
"render"``) come from the benchmark-material root with the path's first component dropped, catalogue
images from ``images/small/<path>``, as in the official preprocessing. Folders are named by ``class_id``,
so query and target sets of one object share a label by name (:func:`objretrieval.data.folder_class_index`).

Run:  uv run examples/prepare_abo.py --csv abo-mvr.csv.xz --images images/small \
          --renders abo-benchmark-material --out data/abo [--link]
Then: ImageSetDataset(out / "test.query", ...) and ImageSetDataset(out / "test.target", ...).
"""

from __future__ import annotations

import argparse
import csv
import lzma
import os
import shutil
from pathlib import Path

SPLITS = ("test-query", "test-target")


def source_path(row: dict[str, str], images: Path, renders: Path) -> Path:
    if row["image_type"] == "render":
        return renders.joinpath(*row["path"].split("/")[1:])
    return images / row["path"]


def prepare(csv_path: Path, images: Path, renders: Path, out: Path, link: bool = False) -> dict[str, int]:
    """Copy (or hard-link) the test split's images into per-object folders; returns images per split."""
    opener = lzma.open if csv_path.suffix == ".xz" else open
    counts = dict.fromkeys(SPLITS, 0)
    missing = 0
    with opener(csv_path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            split = row["split_set"]
            if split not in counts:
                continue
            src = source_path(row, images, renders)
            if not src.is_file():
                missing += 1
                continue
            folder = out / split.replace("-", ".") / str(row["class_id"])
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / os.path.basename(row["path"])
            if not dst.exists():
                os.link(src, dst) if link else shutil.copyfile(src, dst)
            counts[split] += 1
    if missing:
        print(f"warning: {missing} listed images were not found under {images} or {renders}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", type=Path, required=True, help="abo-mvr.csv.xz (or an uncompressed .csv)")
    parser.add_argument("--images", type=Path, required=True, help="the extracted images/small folder")
    parser.add_argument(
        "--renders", type=Path, required=True, help="the extracted abo-benchmark-material folder"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--link", action="store_true", help="hard-link instead of copying")
    args = parser.parse_args()
    counts = prepare(args.csv, args.images, args.renders, args.out, args.link)
    for split, n in counts.items():
        objects = len(list((args.out / split.replace("-", ".")).glob("*")))
        print(f"{split}: {n} images of {objects} objects")


if __name__ == "__main__":
    main()
