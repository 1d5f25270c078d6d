"""Quickstart: train an embedding network with ContextualLoss and evaluate zero-shot retrieval.

Trains a small CNN on random views (rotated, scaled, shifted) of handwritten digits 0-4 (scikit-learn's
bundled dataset) with the contextual loss of Liao et al. (ICML 2023) and class-balanced batches, then
evaluates retrieval on random views of the unseen digits 5-9. Prints Recall@K and MAP@R of raw pixels, the
untrained network and the trained one, and saves a picture of queries with their five nearest neighbours
under the trained model (green border: same digit, red: another).

As in the paper's 224x224 code, the loss is computed on a training-only projection head and retrieval uses
the features before it: the head specialises to the five training classes, the features below it transfer
to unseen ones.

Run:  uv run --extra examples examples/quickstart.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from digits import embed, random_views, zero_shot_split
from torch import nn
from tqdm.auto import tqdm

from objretrieval import RetrievalEvaluator, knn
from objretrieval.losses import ContextualLoss
from objretrieval.samplers import MPerClassSampler
from objretrieval.visualization import draw_neighbours

METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r"]


class Embedder(nn.Module):
    """A small CNN: 128-d retrieval features, and a 64-d projection head that only the loss sees."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training embedding (the loss L2-normalises it)."""
        return self.head(self.features(x))


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return RetrievalEvaluator(METRICS)(embeddings, labels).metrics


def save_neighbours(
    embeddings: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, path: Path, k: int = 5
) -> None:
    """One query per class (left column) and its k nearest neighbours among the other test images."""
    classes = torch.unique(labels)
    picks = torch.stack([(labels == c).nonzero()[0, 0] for c in classes])
    neighbours = knn(embeddings[picks], embeddings, k=k, exclude=picks)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_neighbours(
        images[picks],
        images,
        neighbours,
        query_labels=labels[picks],
        gallery_labels=labels,
        title="Trained model: a query per unseen digit (left) and its nearest neighbours\n"
        "green = same digit, red = another digit",
        cmap="gray_r",
        path=path,
    )
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--m", type=int, default=16, help="images per class in a batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=16, help="digits are upsampled to size x size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart_neighbours.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # more threads help this small network little, hurt when busy
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    train_images, train_labels, test_views, test_labels = zero_shot_split(args.seed, size=args.size)

    model = Embedder()
    pixels = evaluate(test_views.flatten(1), test_labels)
    before = evaluate(embed(model.features, test_views), test_labels)
    # the 256x256 code's weighting (0.4 contextual, 0.5 contrastive, 0.1 regulariser), k = images per class
    loss_fn = ContextualLoss()
    sampler = MPerClassSampler(train_labels, batch_size=5 * args.m, m=args.m, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(sampler))
    augment = torch.Generator().manual_seed(args.seed)

    progress = tqdm(range(args.epochs), desc="training", unit="epoch")
    for epoch in progress:
        sampler.set_epoch(epoch)
        model.train()
        for batch in sampler:
            index = torch.tensor(batch)
            views = random_views(train_images[index], augment)
            loss = loss_fn(model(views), train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")

    features = embed(model.features, test_views)
    after = evaluate(features, test_labels)
    print(f"\nunseen digits 5-9 as random views: {len(test_labels)} images, leave-one-out retrieval")
    print(f"{'':<12}" + "".join(f"{m:>10}" for m in METRICS))
    for name, values in (("raw pixels", pixels), ("untrained", before), ("trained", after)):
        print(f"{name:<12}" + "".join(f"{100 * values[m]:>10.1f}" for m in METRICS))
    save_neighbours(features, test_views, test_labels, args.out)
    print(
        f"\nneighbours of one query per digit saved to {args.out}  ({time.perf_counter() - start:.0f} s in total)"
    )


if __name__ == "__main__":
    main()
