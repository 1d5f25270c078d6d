"""MIC on handwritten digits: class and interclass (shared) tasks, adversarial decorrelation, re-clustering.

Trains ``mic_resnet10`` (a one-block-per-stage ResNet with 64-d class and shared heads) on digits 0-4 with
MIC's recipe: margin loss with distance-weighted sampling on the class labels; the same loss on cluster
pseudo-labels for the shared head, first from class-centred ``layer1`` features, then re-clustered on the
shared embedding after epochs 3, 7 and 11; the two heads decorrelated through gradient reversal; each task its
own optimiser step. Then ranks the unseen digits 5-9, shown as random views, by the class embedding.

The network starts from scratch, so the learning rates are 100x MIC's (which fine-tunes an ImageNet ResNet50)
and the decorrelation weight is lower (50; MIC: 250-2500): with Adam the weight sets the share of the
adversarial gradient, and at this learning rate a larger share destabilises the class embedding.

Run:  uv run --extra examples examples/mic_train.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from digits import random_views, zero_shot_split
from tqdm.auto import tqdm

from objretrieval import RetrievalEvaluator, create_model
from objretrieval.metrics import normalized_mutual_info
from objretrieval.models import MIC
from objretrieval.samplers import ClusterBatchSampler, MPerClassSampler
from objretrieval.training import InterclassClusters, MICTraining

METRICS = ["recall@1", "recall@2", "recall@4", "map@r", "nmi"]
SIZE = 64  # layer1 maps of 16x16, pooled 6/3 into 4x4 as MIC pools 56x56 by 18/12


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, s, s) digits in [0, 1] -> (N, 3, SIZE, SIZE), roughly zero-mean."""
    x = F.interpolate(images, size=SIZE, mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - 0.25) / 0.4


def batches(images: torch.Tensor, size: int = 256) -> list[torch.Tensor]:
    return [as_rgb(images[i : i + size]) for i in range(0, len(images), size)]


def evaluate(mic: MICTraining, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    embeddings = mic.collect(mic.model.embed, batches(images))
    return RetrievalEvaluator(METRICS)(embeddings, labels).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--m", type=int, default=12, help="images per class in a class batch")
    parser.add_argument("--clusters", type=int, default=12, help="interclass clusters")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--margin-lr", type=float, default=1e-3)
    parser.add_argument("--adversarial-weight", type=float, default=50.0, help="lambda")
    parser.add_argument("--shared-p", type=float, default=0.8, help="probability of the shared task's step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    train_images, train_labels, test_views, test_labels = zero_shot_split(args.seed)
    num_classes = int(train_labels.max()) + 1

    # the trunk starts from scratch here, so BatchNorm trains (MIC freezes its statistics on an ImageNet trunk)
    model = create_model("mic_resnet10", freeze_bn=False, cluster_pool=(6, 3))
    assert isinstance(model, MIC)
    mic = MICTraining(
        model,
        num_classes,
        args.clusters,
        adversarial_weight=args.adversarial_weight,
        task_probabilities=(1.0, args.shared_p),
        generator=torch.Generator().manual_seed(args.seed),
    )
    before = evaluate(mic, test_views, test_labels)
    # MIC's three Adam groups at a from-scratch learning rate; the margins move no faster than the network
    # here (MIC's 50x lets them collapse within an epoch on this tiny problem)
    optimizer = torch.optim.Adam(mic.param_groups(lr=args.lr, margin_lr=args.margin_lr))
    # MIC's step schedule: x0.3 at the milestone
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [args.epochs * 2 // 3], gamma=0.3)

    # interclass pseudo-labels: k-means on class-centred layer1 features of the un-augmented training images
    clusters = InterclassClusters(args.clusters)
    cluster_labels = clusters.initialise(
        mic.collect(model.cluster_features, batches(train_images)), train_labels
    )
    print(
        f"{args.clusters} initial clusters; NMI with the digit classes "
        f"{normalized_mutual_info(cluster_labels, train_labels):.3f} (low: they cut across classes)"
    )
    batch_size = num_classes * args.m
    class_sampler = MPerClassSampler(train_labels, batch_size=batch_size, m=args.m, seed=args.seed)
    shared_sampler = ClusterBatchSampler(cluster_labels, batch_size=batch_size, m=batch_size // args.clusters)
    augment = torch.Generator().manual_seed(args.seed)

    def batch(indices: list[int], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return as_rgb(random_views(train_images[torch.tensor(indices)], augment)), labels

    progress = tqdm(range(args.epochs), desc="training", unit="epoch")
    for epoch in progress:
        class_sampler.set_epoch(epoch)
        shared_sampler.set_epoch(epoch)
        model.train()
        for class_indices, pairs in zip(class_sampler, shared_sampler, strict=False):
            shared_indices, shared_labels = zip(*pairs, strict=True)
            stats = mic.training_step(
                optimizer,
                batch(class_indices, train_labels[torch.tensor(class_indices)]),
                batch(list(shared_indices), torch.tensor(shared_labels)),
            )
        scheduler.step()
        progress.set_postfix(
            class_loss=f"{stats.class_loss:.3f}", adversarial=f"{stats.class_adversarial:.3f}"
        )
        if clusters.due(epoch):  # after epochs 3, 7, 11: re-cluster on the shared embedding
            shared = mic.collect(lambda x: model(x).shared_embedding, batches(train_images))
            shared_sampler.update_labels(clusters.update(shared))
            progress.write(f"epoch {epoch}: re-clustered on the shared embedding")

    after = evaluate(mic, test_views, test_labels)
    print(f"\nunseen digits 5-9 as random views: {len(test_labels)} images, leave-one-out, class embedding")
    print(f"{'':<12}" + "".join(f"{m:>10}" for m in METRICS))
    for name, values in (("untrained", before), ("trained", after)):
        print(f"{name:<12}" + "".join(f"{100 * values[m]:>10.1f}" for m in METRICS))
    print(f"({time.perf_counter() - start:.0f} s in total)")


if __name__ == "__main__":
    main()
