"""MIC's interclass mining (Roth et al., ICCV 2019) as pieces a training loop calls: clusters, losses, steps.

```python
model = create_model("mic_resnet50", weights="IMAGENET1K_V1")
preset = MIC_PRESETS["cub200"]
mic = MICTraining.from_preset(model, "cub200", num_classes=100)
optimizer = torch.optim.Adam(mic.param_groups())
scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, preset.milestones, gamma=0.3)

clusters = InterclassClusters(preset.num_clusters)
labels = clusters.initialise(mic.collect(model.cluster_features, eval_loader), train_class_labels)
shared_sampler = ClusterBatchSampler(labels, batch_size=112, m=4)
for epoch in range(preset.epochs):
    for class_batch, shared_batch in zip(class_loader, shared_loader):   # (images, labels) each
        mic.training_step(optimizer, class_batch, shared_batch)
    scheduler.step()
    if clusters.due(epoch):                    # after epochs 3, 7, 11, ...
        shared = mic.collect(lambda x: model(x).shared_embedding, eval_loader)
        shared_sampler.update_labels(clusters.update(shared))
```

The two tasks take separate optimiser steps: for the class task (class labels) and the shared task (cluster
labels), each with its own probability per iteration, ``L = margin_task + lambda * L_adv``, where ``L_adv``
decorrelates the class and shared embeddings of that batch through gradient reversal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from objretrieval._validation import check_choice, check_embeddings, check_labels, check_positive_int
from objretrieval.display import ConfigRepr
from objretrieval.losses.adversarial import AdversarialDecorrelationLoss
from objretrieval.losses.margin import MarginLoss, Normalizer
from objretrieval.metrics.clustering import kmeans
from objretrieval.miners.distance_weighted import DistanceWeightedMiner
from objretrieval.models.checkpoint import compare_state_dicts
from objretrieval.models.mic import MIC, MICOutput
from objretrieval.progress import show_progress

Task = Literal["class", "shared"]
TASKS: tuple[Task, ...] = get_args(Task)  # in step order
ClusterNormalization = Literal["mean", "mstd", "no_norm"]


@dataclass(frozen=True)
class MICPreset:
    """The official per-dataset settings (``Result_Runs.sh``).

    Attributes:
        num_clusters: k of the interclass clustering.
        adversarial_weight: lambda, the weight of the decorrelation loss.
        task_probabilities: probability of the class and the shared task's step in an iteration.
        milestones: epochs at which the learning rate is multiplied by 0.3.
        epochs: training epochs.
        recall_at: the K of the dataset's Recall@K.
    """

    num_clusters: int
    adversarial_weight: float
    task_probabilities: tuple[float, float]
    milestones: tuple[int, ...]
    epochs: int
    recall_at: tuple[int, ...]


#: MIC's settings per dataset; all use margin loss with distance-weighted sampling, batches of 112, lr 1e-5.
MIC_PRESETS: Mapping[str, MICPreset] = {
    "cub200": MICPreset(30, 2500.0, (1.0, 0.8), (50,), 100, (1, 2, 4, 8)),
    "cars196": MICPreset(150, 500.0, (1.0, 0.8), (60,), 110, (1, 2, 4, 8)),
    "sop": MICPreset(50, 250.0, (1.0, 0.5), (20, 35), 45, (1, 10, 100, 1000)),
    "inshop": MICPreset(150, 250.0, (1.0, 0.8), (50,), 70, (1, 10, 20, 30, 50)),
    "vehicle_id": MICPreset(50, 250.0, (1.0, 0.5), (20, 35), 45, (1, 5)),
}


def class_centred(
    features: Tensor, class_labels: Tensor, normalization: ClusterNormalization = "mean"
) -> Tensor:
    """Remove each class's mean (``"mean"``), also divide by its per-dimension std (``"mstd"``), or nothing.

    What is left after removing the class mean is what varies *within* classes, which MIC's shared head should
    capture across classes. Dimensions with zero spread within a class are left at 0 under ``"mstd"`` (the
    official code divides by 0 there).

    Args:
        features: (N, D).
        class_labels: (N,) integer class labels.
        normalization: ``"mean"``, ``"mstd"`` or ``"no_norm"``.

    Returns:
        (N, D) float32 features.
    """
    normalization = check_choice(normalization, "normalization", ClusterNormalization)
    x = check_embeddings(features, "features").float()
    labels = check_labels(class_labels, "class_labels", x.shape[0], "features").to(x.device)
    if normalization == "no_norm":
        return x
    _, dense = torch.unique(labels, return_inverse=True)
    count = torch.bincount(dense).to(x.dtype)[:, None]
    mean = torch.zeros(count.shape[0], x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, dense, x)
    centred = x - (mean / count)[dense]
    if normalization == "mean":
        return centred
    var = torch.zeros_like(mean).index_add_(0, dense, centred.pow(2)) / count  # population std, as numpy
    std = var.sqrt()[dense]
    return torch.where(std > 0, centred / std.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(centred))


def cluster_labels(
    features: Tensor,
    num_clusters: int,
    *,
    seed: int = 1234,
    niter: int = 25,
    max_points_per_centroid: int = 256,
    nredo: int = 1,
) -> Tensor:
    """k-means pseudo-labels (faiss), configured as ``faiss.Kmeans``'s defaults, which the official code runs.

    (The official code also sets ``n_iter=20`` and ``min_points_per_centroid=5`` as attributes faiss never
    reads, so the defaults apply: 25 iterations, at most 256 training points per centroid.)

    Args:
        features: (N, D) features (already centred if wanted, see :func:`class_centred`).
        num_clusters: k.
        seed: faiss's random seed.
        niter: Lloyd iterations.
        max_points_per_centroid: faiss trains on a sample of at most this many points per centroid.
        nredo: k-means runs from different initialisations, keeping the best (1 as the official code; Lloyd's
            algorithm from a single random start can merge well-separated groups).

    Returns:
        (N,) int64 cluster index in ``[0, num_clusters)`` of each row (nearest centroid).
    """
    assignment, _ = kmeans(
        features,
        num_clusters,
        niter=niter,
        seed=seed,
        min_points_per_centroid=39,  # faiss's default; only decides whether it warns
        max_points_per_centroid=max_points_per_centroid,
        nredo=nredo,
    )
    return assignment


class InterclassClusters(ConfigRepr):
    """The shared task's pseudo-labels and when to recompute them.

    First, k-means on class-centred early-layer features (:meth:`MIC.cluster_features`), which groups images by
    what varies within classes; later, k-means on the shared embedding itself (not centred), after epochs
    ``update_every``, ``2 * update_every + 1``, ... (3, 7, 11, ... for MIC's ``cluster_update_freq=3``).

    Args:
        num_clusters: k of the first clustering.
        update_every: ``cluster_update_freq``: epochs between re-clusterings minus one.
        normalization: class centring of the first clustering (:func:`class_centred`).
        seed: faiss k-means seed.
        nredo: k-means runs per clustering, the best kept (:func:`cluster_labels`).

    Attributes:
        labels: (N,) int64 current pseudo-labels, None before :meth:`initialise`.
        num_found: distinct clusters of the first clustering; later clusterings use that k.
    """

    def __init__(
        self,
        num_clusters: int,
        *,
        update_every: int = 3,
        normalization: ClusterNormalization = "mean",
        seed: int = 1234,
        nredo: int = 1,
    ) -> None:
        self.num_clusters = check_positive_int(num_clusters, "num_clusters")
        self.update_every = check_positive_int(update_every, "update_every", minimum=0)
        self.normalization: ClusterNormalization = check_choice(
            normalization, "normalization", ClusterNormalization
        )
        self.seed, self.nredo = seed, nredo
        self.labels: Tensor | None = None
        self.num_found: int | None = None

    def initialise(self, features: Tensor, class_labels: Tensor) -> Tensor:
        """Cluster ``features`` (N, D) after :func:`class_centred` with ``class_labels`` (N,); returns the labels."""
        centred = class_centred(features, class_labels, self.normalization)
        self.labels = cluster_labels(centred, self.num_clusters, seed=self.seed, nredo=self.nredo)
        self.num_found = int(torch.unique(self.labels).numel())
        return self.labels

    def due(self, epoch: int) -> bool:
        """Whether to re-cluster after 0-based ``epoch`` (the official counter: epochs 3, 7, 11, ... for 3)."""
        return (epoch + 1) % (self.update_every + 1) == 0

    def update(self, shared_embeddings: Tensor) -> Tensor:
        """Re-cluster on the (N, D) shared embeddings of the training images, in dataset order; returns the labels."""
        if self.num_found is None or self.labels is None:
            raise RuntimeError("call initialise() before update()")
        check_embeddings(shared_embeddings, "shared_embeddings")
        if shared_embeddings.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"shared_embeddings has {shared_embeddings.shape[0]} rows but the clustered set has "
                f"{self.labels.shape[0]} images"
            )
        self.labels = cluster_labels(shared_embeddings, self.num_found, seed=self.seed, nredo=self.nredo)
        return self.labels


class MICLossOutput(NamedTuple):
    """One task's loss on one batch.

    Attributes:
        loss: scalar ``metric + adversarial_weight * adversarial``, to back-propagate.
        metric: the task's margin loss.
        adversarial: the unweighted decorrelation loss.
        output: the network's outputs on the batch.
    """

    loss: Tensor
    metric: Tensor
    adversarial: Tensor
    output: MICOutput


class MICStepStats(NamedTuple):
    """What :meth:`MICTraining.training_step` did; a task's entries are None when its step was skipped."""

    class_loss: float | None
    shared_loss: float | None
    class_adversarial: float | None
    shared_adversarial: float | None


class MICTraining(ConfigRepr, nn.Module):
    """MIC's objective around a :class:`~objretrieval.models.MIC`: two margin losses and the decorrelation loss.

    Holds the learnable loss parameters: per-class margins for the class task, per-cluster margins for the
    shared task (both initialised to 1.2, names ``class_loss.beta`` and ``shared_loss.beta``) and the
    decorrelation's projection network (``adversarial.regressor.*``). Triplets come from distance-weighted
    sampling (one per anchor).

    Args:
        model: the MIC network.
        num_classes: training classes.
        num_clusters: pseudo-label clusters (the shared margin count).
        adversarial_weight: lambda (CUB 2500, Cars 500, SOP/In-Shop/VehicleID 250).
        task_probabilities: probability of the class and the shared step per iteration.
        margin: alpha of both margin losses.
        beta: initial margins.
        projection_dim: hidden width of the projection network.
        normalizer: the margin loss's ``"active_terms"`` (paper) or ``"active_triplets"`` (official code on
            torch >= 1.2) normalisation.
        miner: triplet miner; by default :class:`~objretrieval.miners.DistanceWeightedMiner` (cutoff 0.5, no
            upper cutoff), drawing from ``generator``.
        generator: random generator of the triplets and of the task draws.
    """

    # the losses' arguments are read back from the losses (the learnable margins beta are state)
    config_attributes: ClassVar[dict[str, str | None]] = {
        "num_classes": "class_loss.num_classes",
        "num_clusters": "shared_loss.num_classes",
        "margin": "class_loss.margin",
        "projection_dim": "adversarial.proj_dim",
        "normalizer": "class_loss.normalizer",
    }

    def __init__(
        self,
        model: MIC,
        num_classes: int,
        num_clusters: int,
        *,
        adversarial_weight: float = 2500.0,
        task_probabilities: tuple[float, float] = (1.0, 0.8),
        margin: float = 0.2,
        beta: float = 1.2,
        projection_dim: int = 512,
        normalizer: Normalizer = "active_terms",
        miner: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if len(task_probabilities) != 2 or not all(0.0 <= float(p) <= 1.0 for p in task_probabilities):
            raise ValueError(f"task_probabilities must be two probabilities, got {task_probabilities}")
        self.model = model
        self.class_loss = MarginLoss(num_classes, margin, beta, normalizer=normalizer)
        self.shared_loss = MarginLoss(num_clusters, margin, beta, normalizer=normalizer)
        self.adversarial = AdversarialDecorrelationLoss(model.class_dim, model.shared_dim, projection_dim)
        self.miner = miner if miner is not None else DistanceWeightedMiner(generator=generator)
        self.adversarial_weight = float(adversarial_weight)
        self.task_probabilities = (float(task_probabilities[0]), float(task_probabilities[1]))
        self.generator = generator

    @classmethod
    def from_preset(cls, model: MIC, dataset: str, num_classes: int, **overrides: Any) -> MICTraining:
        """Build with :data:`MIC_PRESETS` ``[dataset]``'s clusters, weight and task probabilities."""
        preset = MIC_PRESETS[check_choice(dataset, "dataset", tuple(MIC_PRESETS))]
        settings: dict[str, Any] = {
            "num_clusters": preset.num_clusters,
            "adversarial_weight": preset.adversarial_weight,
            "task_probabilities": preset.task_probabilities,
        }
        return cls(model, num_classes, **{**settings, **overrides})

    def param_groups(
        self,
        lr: float = 1e-5,
        weight_decay: float = 4e-4,
        margin_lr: float = 5e-4,
        projection_weight_decay: float = 1e-6,
    ) -> list[dict[str, Any]]:
        """MIC's three Adam groups: network (lr, 4e-4), margins (5e-4, no decay), projection (lr, 1e-6)."""
        network = [p for p in self.model.parameters() if p.requires_grad]
        margins = [p for loss in (self.class_loss, self.shared_loss) for p in loss.parameters()]
        return [
            {"params": network, "lr": lr, "weight_decay": weight_decay},
            {"params": margins, "lr": margin_lr, "weight_decay": 0.0},
            *self.adversarial.param_groups(lr, projection_weight_decay),
        ]

    def task_loss(self, task: Task, images: Tensor, labels: Tensor) -> MICLossOutput:
        """The loss of one task on one batch.

        Args:
            task: ``"class"`` (labels are classes) or ``"shared"`` (labels are cluster pseudo-labels).
            images: (B, 3, H, W).
            labels: (B,) int64 labels of that task.
        """
        task = check_choice(task, "task", Task)
        output = self.model(images)
        labels = check_labels(labels, "labels", output.class_embedding.shape[0], "images")
        labels = labels.to(output.class_embedding.device)
        embedding = output.class_embedding if task == "class" else output.shared_embedding
        loss_fn = self.class_loss if task == "class" else self.shared_loss
        metric = loss_fn(embedding, labels, self.miner(embedding, labels))
        adversarial = self.adversarial(output.class_embedding, output.shared_embedding)
        return MICLossOutput(metric + self.adversarial_weight * adversarial, metric, adversarial, output)

    def training_step(
        self,
        optimizer: torch.optim.Optimizer,
        class_batch: tuple[Tensor, Tensor],
        shared_batch: tuple[Tensor, Tensor],
    ) -> MICStepStats:
        """One MIC iteration: each task, with its probability, takes its own optimiser step on its batch.

        Args:
            optimizer: built over :meth:`param_groups`.
            class_batch: ``(images, class labels)``.
            shared_batch: ``(images, cluster labels)`` (e.g. from a ``ClusterBatchSampler``).
        """
        stats: dict[str, float | None] = {}
        for task, (images, labels), p in zip(
            TASKS, (class_batch, shared_batch), self.task_probabilities, strict=True
        ):
            stats[f"{task}_loss"] = stats[f"{task}_adversarial"] = None
            draw = torch.rand((), generator=self.generator)
            if float(draw) >= p:
                continue
            out = self.task_loss(task, images, labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            stats[f"{task}_loss"], stats[f"{task}_adversarial"] = out.metric.item(), out.adversarial.item()
        return MICStepStats(**stats)

    @torch.no_grad()
    def collect(
        self, fn: Callable[[Tensor], Tensor], batches: Iterable[Any], *, progress: bool | None = None
    ) -> Tensor:
        """``fn`` over image batches in eval mode, concatenated on the CPU; the training mode is restored.

        Args:
            fn: e.g. ``model.cluster_features`` or ``lambda x: model(x).shared_embedding``.
            batches: image tensors (B, 3, H, W) or tuples whose first element is one (a ``DataLoader`` over the
                training images in dataset order, with evaluation transforms).
            progress: a bar over the batches; None (the default): for a ``DataLoader`` of 10,000 images or more.
        """
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            out = []
            dataset: Any = getattr(batches, "dataset", None)
            show = show_progress(progress, len(dataset) if hasattr(dataset, "__len__") else None, "images")
            for batch in tqdm(batches, disable=not show, desc="collect", unit="batch"):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                out.append(fn(images.to(device)).float().cpu())
        finally:
            self.model.train(was_training)
        if not out:
            raise ValueError("batches is empty")
        return torch.cat(out)

    def load_official_criteria(self, state: Mapping[str, Tensor]) -> None:
        """Load the official ``Criterions`` module dict's state (``Class.beta``, ``Shared.beta``,
        ``MutualInfo-Class-Shared.regressor.*``), which the official checkpoints leave out but a patched run
        may save."""
        mapped: dict[str, Tensor] = {}
        for key, value in state.items():
            if key == "Class.beta":
                mapped["class_loss.beta"] = value
            elif key == "Shared.beta":
                mapped["shared_loss.beta"] = value
            elif key.startswith("MutualInfo-Class-Shared."):
                mapped["adversarial." + key[len("MutualInfo-Class-Shared.") :]] = value
            else:
                raise KeyError(f"unexpected key in the official MIC criteria: {key!r}")
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}
        mismatch = compare_state_dicts(own, mapped)
        if mismatch is not None:
            raise mismatch
        self.load_state_dict(mapped, strict=False)
