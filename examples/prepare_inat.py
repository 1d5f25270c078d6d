"""Prepare MILE's iNaturalist 2017 set-retrieval benchmark from your ``train_val_images`` folder.

For each supercategory, ``--species`` species folders are drawn (seeded, unlike the official script's
unseeded shuffle) and each species' images, in sorted order (the official script uses unsorted ``glob``),
are split: the first ``n // 2 + 1`` go to ``query/``, the rest to ``target/``, in folders named
``<Supercategory>_<species-with-dashes>``. Labels then come from folder names
(:func:`objretrieval.data.folder_class_index`), not from listing order. The official split cannot be
reproduced exactly; this one can.

Run:  uv run examples/prepare_inat.py --root inat2017/train_val_images --out data/inat [--species 100] [--link]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path


def prepare(root: Path, out: Path, species: int = 100, seed: int = 0, link: bool = False) -> dict[str, int]:
    """Write the query/target split; returns the number of images per split."""
    if not root.is_dir():
        raise FileNotFoundError(f"train_val_images folder not found: {root}")
    rng = random.Random(seed)
    counts = {"query": 0, "target": 0}
    for supercategory in sorted(p for p in root.iterdir() if p.is_dir()):
        folders = sorted(p for p in supercategory.iterdir() if p.is_dir())
        rng.shuffle(folders)
        for folder in folders[:species]:
            files = sorted(folder.glob("*.jpg"))
            threshold = len(files) // 2
            name = f"{supercategory.name}_{folder.name.replace(' ', '-')}"
            for i, src in enumerate(files):
                split = "query" if i <= threshold else "target"
                dst_dir = out / split / name
                dst_dir.mkdir(parents=True, exist_ok=True)
                dst = dst_dir / src.name
                if not dst.exists():
                    os.link(src, dst) if link else shutil.copyfile(src, dst)
                counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="iNat2017 train_val_images folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--species", type=int, default=100, help="species per supercategory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--link", action="store_true", help="hard-link instead of copying")
    args = parser.parse_args()
    for split, n in prepare(args.root, args.out, args.species, args.seed, args.link).items():
        print(f"{split}: {n} images of {len(list((args.out / split).glob('*')))} species")


if __name__ == "__main__":
    main()
