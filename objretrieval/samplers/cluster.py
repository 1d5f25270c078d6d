"""``ClusterBatchSampler``: MIC's batches for the shared (interclass) task, with cluster-label noise.

MIC trains its shared head on k-means pseudo-labels that are recomputed during training. Its batches hold
``batch_size // m`` clusters with ``m`` images each; to keep the head from overfitting a poor clustering, each
image is replaced, with probability ``random_pick_p`` (0.2), by an image of a uniformly drawn cluster while
keeping the label of the cluster it stands in for. An index alone then no longer tells its label, so this
sampler yields ``(index, label)`` pairs and :class:`PseudoLabelledDataset` turns them into
``(image, label)``:

```python
sampler = ClusterBatchSampler(cluster_labels, batch_size=112, m=4, seed=0)
loader = DataLoader(PseudoLabelledDataset(train_images), batch_sampler=sampler, num_workers=8)
for epoch in range(epochs):
    sampler.set_epoch(epoch)
    for images, labels in loader:
        ...
    if new_labels is not None:              # after a re-clustering
        sampler.update_labels(new_labels)
```

Unlike the official ``ClusterDataset``, the batches are built in the main process (not per DataLoader
worker), depend only on ``(seed, epoch, labels)`` and split between DDP ranks like :class:`MPerClassSampler`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from objretrieval._validation import check_number
from objretrieval.display import ConfigRepr
from objretrieval.samplers._common import IntArray, SmallClasses, as_label_array
from objretrieval.samplers.m_per_class import MPerClassSampler


class ClusterBatchSampler(MPerClassSampler):
    """Batches of ``batch_size // m`` clusters x ``m`` images whose images are swapped at random, label kept.

    The layout is :class:`MPerClassSampler`'s over the cluster labels (every image at least once per epoch,
    distinct clusters within a batch). Then every slot, independently with probability ``random_pick_p``,
    takes a uniformly drawn image of a uniformly drawn cluster (possibly its own), and the slot keeps its
    cluster's label, as MIC's ``ClusterDataset`` does.

    Args:
        labels: (N,) non-negative integer cluster label of each dataset sample.
        batch_size: pairs per batch; a multiple of ``m``.
        m: images per cluster in a batch (MIC: 4).
        random_pick_p: probability of replacing a slot's image by a random cluster's image (MIC: 0.2).
        seed: non-negative base seed; the draws depend only on ``(seed, epoch, labels)``.
        small_classes: policy for clusters with fewer than ``m`` images; ``"replace"`` (default) repeats
            their images, as the official sampler does.
        rank: this process's rank, as :class:`MPerClassSampler`.
        world_size: number of ranks, as :class:`MPerClassSampler`.

    Each batch is a list of ``batch_size`` ``(dataset index, label)`` pairs.
    """

    def __init__(
        self,
        labels: Any,
        batch_size: int,
        m: int = 4,
        *,
        random_pick_p: float = 0.2,
        seed: int = 0,
        small_classes: SmallClasses = "replace",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.random_pick_p = check_number(random_pick_p, "random_pick_p", low=0.0, high=1.0)
        super().__init__(
            labels, batch_size, m, seed=seed, small_classes=small_classes, rank=rank, world_size=world_size
        )

    def update_labels(self, labels: Any) -> None:
        """Replace the cluster labels (after a re-clustering); takes effect at the next iteration.

        Args:
            labels: (N,) non-negative integer cluster labels, one per dataset sample, in dataset order.

        Raises:
            TypeError: ``labels`` is not an integer array.
            ValueError: ``labels`` does not have one entry per dataset sample (fewer would silently train
                on a subset of the images), holds a negative label, or has too few clusters for a batch.
                The sampler keeps its previous labels.
        """
        new = as_label_array(labels, "labels")
        if new.size != self.labels.size:
            raise ValueError(
                f"labels has {new.size} entries, but the sampler was built for {self.labels.size} dataset "
                "samples: update_labels needs one cluster label per sample, in dataset order"
            )
        self._set_labels(new)

    def _set_labels(self, labels: Any) -> None:
        values = as_label_array(labels, "labels")
        # cluster ids are k-means indices; a negative one is usually a clusterer's "noise" marker, which would
        # otherwise be trained on as one big real cluster
        if values.min() < 0:
            first = int(np.argmax(values < 0))
            raise ValueError(
                f"labels must be non-negative cluster ids, got {int(values[first])} at index {first}"
            )
        super()._set_labels(values)

    def _global_batches(self, rng: np.random.Generator) -> IntArray:
        """(num_batches, batch_size, 2) int64 ``[index, label]`` pairs."""
        indices = super()._global_batches(rng)
        slot_labels = self.labels[indices]
        swap = rng.random(indices.shape) < self.random_pick_p
        if swap.any():
            table = self.table
            cluster = rng.integers(0, table.num_classes, size=int(swap.sum()))
            member = (rng.random(cluster.size) * table.sizes[cluster]).astype(np.int64)
            indices = indices.copy()
            indices[swap] = table.members[table.offsets[cluster] + member]
        return np.stack([indices, slot_labels], axis=-1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        for batch in super().__iter__():
            pairs: list[list[int]] = batch  # type: ignore[assignment]  # rows of _global_batches are pairs
            yield [(index, label) for index, label in pairs]


class PseudoLabelledDataset(ConfigRepr, Dataset[tuple[Any, int]]):
    """Wrap an image dataset so that ``dataset[(index, label)]`` gives ``(image, label)``.

    For :class:`ClusterBatchSampler`, whose labels are not the dataset's own. The wrapped dataset may return
    the image alone or a tuple whose first element is the image (e.g. ``(image, class_label)``).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int]:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"PseudoLabelledDataset takes (index, label) pairs from a ClusterBatchSampler, got {item!r}"
            )
        index, label = item
        sample = self.dataset[index]
        image = sample[0] if isinstance(sample, (tuple, list)) else sample
        return image, int(label)
