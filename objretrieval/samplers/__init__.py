"""Batch samplers for deep metric learning.

All are *batch samplers* (``torch.utils.data.Sampler[list[int]]``): pass them as
``DataLoader(dataset, batch_sampler=sampler)`` and call ``sampler.set_epoch(epoch)`` before every epoch.

- :class:`MPerClassSampler`: ``batch_size // m`` distinct classes x ``m`` samples per batch.
- :class:`HierarchicalSampler`: two half-batches of that form, from two different super-labels.
- :class:`ClusterBatchSampler`: MIC's shared-task batches over cluster pseudo-labels, with label noise; it
  yields ``(index, label)`` pairs for a :class:`PseudoLabelledDataset`.

The first two cover every sample of a kept class at least once per epoch. All are deterministic in
``(seed, epoch)`` (a local ``numpy.random.Generator``, never the global generators) and split their batches
between DDP ranks so that every rank yields the same number of batches.
"""

from objretrieval.samplers.cluster import ClusterBatchSampler, PseudoLabelledDataset
from objretrieval.samplers.hierarchical import HierarchicalSampler
from objretrieval.samplers.m_per_class import MPerClassSampler

__all__ = ["ClusterBatchSampler", "HierarchicalSampler", "MPerClassSampler", "PseudoLabelledDataset"]
