"""Train AMES on local-descriptor files: a full-precision teacher with pair BCE, then a binarized student
distilled from it (the training the AMES paper describes; the official repository ships none).

The example writes its own descriptor files in AMES's layout (``features`` (N, T, 5 + D), sorted by weight): each
"object" has a set of part descriptors; an image of it shows a random subset of those parts (with noise) among
background clutter shared by all objects, so two images match when they share parts (``parts.py``). Training
reads batches of images from the files by index, as it would from real extracted descriptors. Objects of the
validation file are unseen in training; the script prints the ROC AUC of match logits on validation pairs.

Run:  uv run examples/ames_train.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from parts import part_images, sample_pairs

from objretrieval.descriptors import DescriptorStore
from objretrieval.losses import PairBCELoss, PairDistillationLoss
from objretrieval.models import AMES


def write_descriptor_file(
    path: Path, objects: int, images_per_object: int, dim: int, rows: int, generator: torch.Generator
) -> np.ndarray:
    """Synthetic images of ``objects`` objects written as AMES rows; returns the (N,) object labels."""
    images = part_images(objects, images_per_object, dim, rows, generator)
    with DescriptorStore.create(path, len(images.labels), rows, dim) as store:
        store.write(0, images.rows())
    return images.labels


def read_pairs(store: DescriptorStore, queries: np.ndarray, database: np.ndarray, args: argparse.Namespace):
    q, q_pad = store.read(queries, args.query_descriptors)
    d, d_pad = store.read(database, args.db_descriptors)
    return q, d, q_pad, d_pad


def roc_auc(scores: torch.Tensor, match: np.ndarray) -> float:
    """Probability that a matching pair outscores a non-matching one (ties count half)."""
    s = scores.numpy()
    pos, neg = s[match], s[~match]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


@torch.no_grad()
def evaluate(model: AMES, store: DescriptorStore, pairs: tuple, args: argparse.Namespace) -> float:
    model.eval()
    queries, database, match = pairs
    scores = model(*read_pairs(store, queries, database, args)).float()
    return roc_auc(scores, match)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="steps per stage (teacher, then student)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32, help="local descriptor dimension")
    parser.add_argument(
        "--model-dim", type=int, default=64, help="AMES width = bits of the binarized student"
    )
    parser.add_argument("--query-descriptors", type=int, default=40)
    parser.add_argument("--db-descriptors", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("ames_train_out"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = max(args.query_descriptors, args.db_descriptors)
    train_labels = write_descriptor_file(args.out / "train_local.h5", 600, 4, args.dim, rows, g)
    val_labels = write_descriptor_file(args.out / "val_local.h5", 20, 6, args.dim, rows, g)
    val_pairs = sample_pairs(val_labels, 512, rng)

    def build(binarized: bool) -> AMES:
        return AMES(
            args.dim, model_dim=args.model_dim, num_encoder_layers=2, dim_feedforward=128, binarized=binarized
        )

    teacher, student = build(False), build(True)
    with (
        DescriptorStore(args.out / "train_local.h5") as train,
        DescriptorStore(args.out / "val_local.h5") as val,
    ):
        print(f"{'model':<28} {'val AUC':>8}")
        print(f"{'untrained teacher':<28} {evaluate(teacher, val, val_pairs, args):>8.3f}")
        stages = [
            ("teacher (pair BCE)", teacher, PairBCELoss()),
            ("binarized student (distil)", student, None),
        ]
        distil = PairDistillationLoss(alpha=0.5)
        for name, model, bce in stages:
            if model is student:  # the transformer starts from the teacher; only the input projection differs
                shared = {k: v for k, v in teacher.state_dict().items() if not k.startswith("remap_local.")}
                student.load_state_dict(shared, strict=False)
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
            start = time.perf_counter()
            model.train()
            for _ in range(args.steps):
                queries, database, match = sample_pairs(train_labels, args.batch_size, rng)
                inputs = read_pairs(train, queries, database, args)
                logits = model(*inputs)
                targets = torch.from_numpy(match)
                if bce is not None:
                    loss = bce(logits, targets)
                else:
                    with torch.no_grad():
                        teacher_logits = teacher.eval()(*inputs)
                    loss = distil(logits, teacher_logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            elapsed = time.perf_counter() - start
            print(
                f"{name:<28} {evaluate(model, val, val_pairs, args):>8.3f}   ({args.steps} steps, {elapsed:.1f} s)"
            )


if __name__ == "__main__":
    main()
