"""The batch samplers in real gloo process groups (2 and 3 ranks): they compose with DDP training.

In each rank the samplers are built without ``rank``/``world_size``, so they take them from the process group,
and drive a ``DataLoader`` whose every step runs collectives (an ``all_gather`` of the batch, and DDP's
gradient all-reduce). The parent compares what the ranks saw with the single-process sampler of the same
seed: at step ``t`` the ranks hold global batches ``t * W .. t * W + W - 1`` (rank order, wrapping around to
the start of the epoch's list for the last round).
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from objretrieval.distributed import DistributedLoss
from objretrieval.losses import ContrastiveLoss
from objretrieval.samplers import ClusterBatchSampler, HierarchicalSampler, MPerClassSampler
from objretrieval.samplers.cluster import PseudoLabelledDataset
from tests.spawn import run_world

EPOCHS = (0, 3)
SEED = 9


def make_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of 37 classes of 3-9 samples (shuffled), super-labels of 3 groups, cluster ids of 6 groups."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(3, 10, size=37)
    labels = rng.permutation(np.repeat(np.arange(37) * 5 + 100, sizes)).astype(np.int64)
    supers = (labels // 5) % 3
    clusters = rng.integers(0, 6, size=labels.size)
    return labels, supers.astype(np.int64), clusters.astype(np.int64)


def build(kind: str, **world: Any) -> MPerClassSampler | HierarchicalSampler:
    labels, supers, clusters = make_data()
    if kind == "m_per_class":
        return MPerClassSampler(labels, 16, 4, seed=SEED, small_classes="replace", **world)
    if kind == "hierarchical":
        return HierarchicalSampler(labels, supers, 16, 4, seed=SEED, small_classes="replace", **world)
    return ClusterBatchSampler(clusters, 12, 4, seed=SEED, **world)


KINDS = ("m_per_class", "hierarchical", "cluster")


def _train(rank: int, world: int) -> dict[str, Any]:
    """Per sampler: its rank/world/len, and per epoch the batches every step gathered and this rank's steps.

    A tiny DDP model trains on each rank's batches with ``DistributedLoss``, so a rank with fewer steps would
    leave the others waiting in a collective (the spawn helper's timeout would fail the test); after training,
    every rank's parameters are returned to check that they stayed identical.
    """
    labels, _, _ = make_data()
    features = torch.randn(labels.size, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out: dict[str, Any] = {}
    for kind in KINDS:
        sampler = build(kind)
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Linear(8, 4).double())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = DistributedLoss(ContrastiveLoss())
        targets = torch.from_numpy(labels)
        dataset = TensorDataset(torch.arange(labels.size), targets)
        if kind == "cluster":
            dataset = PseudoLabelledDataset(dataset)
        record: dict[str, Any] = {"rank": sampler.rank, "world": sampler.world_size, "len": len(sampler)}
        for epoch in EPOCHS:
            sampler.set_epoch(epoch)
            steps: list[list[list[int]]] = []
            for index, y in DataLoader(dataset, batch_sampler=sampler):
                every = [torch.empty_like(index) for _ in range(world)]
                dist.all_gather(every, index)  # the same batch size on every rank
                steps.append([t.tolist() for t in every])
                loss = loss_fn(model(features[index]), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            record[epoch] = steps
        record["params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
        out[kind] = record
        # a DistributedDataParallel alive when the spawn helper destroys the group can make gloo abort
        del model, optimizer
        gc.collect()
    return out


def single_process_batches(kind: str, epoch: int) -> list[list[int]]:
    sampler = build(kind, rank=0, world_size=1)
    sampler.set_epoch(epoch)
    if kind == "cluster":  # (index, label) pairs; the loader's first field holds the indices
        return [[index for index, _ in batch] for batch in sampler]
    return list(sampler)


@pytest.mark.parametrize("world", [2, 3])
def test_samplers_split_the_single_process_epoch_over_ranks_with_equal_steps(world: int) -> None:
    results = run_world(_train, world)
    for kind in KINDS:
        records = [result[kind] for result in results]
        assert [(r["rank"], r["world"]) for r in records] == [(rank, world) for rank in range(world)], kind
        for epoch in EPOCHS:
            single = single_process_batches(kind, epoch)
            steps = -(-len(single) // world)
            assert {r["len"] for r in records} == {steps}, kind
            padded = [single[i % len(single)] for i in range(steps * world)]
            expected = [padded[t * world : (t + 1) * world] for t in range(steps)]
            for r in records:  # every rank ran every step and gathered the same global batches
                assert r[epoch] == expected, (kind, epoch, r["rank"])
        assert records[0][EPOCHS[0]] != records[0][EPOCHS[1]], f"{kind}: set_epoch did not change the batches"
        for r in records[1:]:
            assert torch.equal(r["params"], records[0]["params"]), f"{kind}: DDP replicas drifted apart"
