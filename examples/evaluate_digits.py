"""Zero-shot retrieval evaluation on scikit-learn's bundled handwritten digits.

The deep-metric-learning protocol: classes 0-4 are "seen" (available for fitting), classes 5-9 are "unseen"
and form the test set, where every image queries all the others. Three embeddings are compared on clean
digits and on randomly rotated, scaled and shifted views of them:

- raw pixels,
- an untrained convolutional network (what training would start from),
- PCA fitted on the seen classes only.

Run:  uv run --extra examples examples/evaluate_digits.py
"""

from __future__ import annotations

import argparse

import torch
from digits import load, zero_shot_split
from torch import nn

from objretrieval import RetrievalEvaluator

METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"]


def untrained_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # the quickstart's and the training benchmark's split: the same random views for the same seed
    seen_images, _, views, test_labels = zero_shot_split(args.seed)
    test_images, _ = load(seen=False)

    mean = seen_images.flatten(1).mean(0)
    _, _, components = torch.pca_lowrank(seen_images.flatten(1) - mean, q=32, center=False)
    cnn = untrained_cnn(args.seed)
    embedders = {
        "pixels": lambda x: x.flatten(1),
        "untrained CNN": lambda x: cnn(x),
        "PCA on seen digits": lambda x: (x.flatten(1) - mean) @ components,
    }

    evaluator = RetrievalEvaluator(METRICS)
    print(f"unseen digits 5-9: {len(test_labels)} images, leave-one-out retrieval (cosine)\n")
    header = f"{'embedding':<20} {'test set':<14}" + "".join(f"{m:>10}" for m in METRICS)
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for name, embed in embedders.items():
            for split, images in (("clean", test_images), ("random views", views)):
                result = evaluator(embed(images), test_labels)
                print(f"{name:<20} {split:<14}" + "".join(f"{100 * result[m]:>10.1f}" for m in METRICS))


if __name__ == "__main__":
    main()
