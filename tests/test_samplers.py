"""Behaviour of the class-balanced batch samplers (objretrieval.samplers)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from objretrieval.samplers import ClusterBatchSampler, HierarchicalSampler, MPerClassSampler

BIG = 2**25  # label values above 2**24 (where float32 would merge neighbours)


def make_labels(
    num_classes: int = 120, low: int = 4, high: int = 9, seed: int = 0, num_small: int = 0
) -> np.ndarray:
    """Labels of ``num_classes`` classes with ``low..high`` samples each (plus ``num_small`` classes of 1-3
    samples), in a shuffled sample order, with class values far from 0..C-1 (some above 2**24)."""
    rng = np.random.default_rng(seed)
    sizes = np.concatenate([rng.integers(low, high + 1, num_classes), rng.integers(1, 4, num_small)])
    values = BIG + 7 * np.arange(sizes.size) - 300
    return rng.permutation(np.repeat(values, sizes)).astype(np.int64)


def make_super_labels(labels: np.ndarray, num_supers: int, weights: list[float] | None = None) -> np.ndarray:
    """A super-label per sample, constant within a class (classes assigned round-robin or by ``weights``)."""
    values = np.unique(labels)
    if weights is None:
        owner = np.arange(values.size) % num_supers
    else:
        owner = np.random.default_rng(1).choice(num_supers, size=values.size, p=weights)
    return (owner[np.searchsorted(values, labels)] * 1000 - 5).astype(np.int64)


def class_groups(batch: list[int], labels: np.ndarray, m: int, *, replace_ok: bool = False) -> np.ndarray:
    """Check one run of m-index class groups; return the class of each group."""
    index = np.asarray(batch).reshape(-1, m)
    classes = labels[index]
    assert (classes == classes[:, :1]).all(), f"a group of {m} mixes classes: {classes.tolist()}"
    sizes = Counter(labels.tolist())
    for row, cls in zip(index, classes[:, 0], strict=True):
        if len(set(row.tolist())) != m:
            assert replace_ok and sizes[int(cls)] < m, (
                f"repeated index in the group {row.tolist()} of class {cls}"
            )
    group_classes = classes[:, 0]
    assert len(set(group_classes.tolist())) == group_classes.size, f"a class appears twice: {group_classes}"
    return group_classes


def check_m_per_class(batches: list[list[int]], labels: np.ndarray, batch_size: int, m: int, **kw) -> None:
    for batch in batches:
        assert len(batch) == batch_size
        assert len(class_groups(batch, labels, m, **kw)) == batch_size // m


def check_hierarchical(
    batches: list[list[int]], labels: np.ndarray, supers: np.ndarray, batch_size: int, m: int, **kw
) -> None:
    half = batch_size // 2
    for batch in batches:
        assert len(batch) == batch_size
        halves = [batch[:half], batch[half:]]
        half_supers = []
        for part in halves:
            assert len(class_groups(part, labels, m, **kw)) == half // m
            values = set(supers[part].tolist())
            assert len(values) == 1, f"a half-batch mixes super-labels {values}"
            half_supers.append(values.pop())
        assert half_supers[0] != half_supers[1], "both halves come from the same super-label"


def covered(batches: list[list[int]]) -> set[int]:
    return {i for batch in batches for i in batch}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return make_labels()


# ------------------------------------------------------------------------------------------------- MPerClass


@pytest.mark.parametrize(("batch_size", "m"), [(32, 4), (24, 3), (16, 2), (8, 4)])
def test_m_per_class_batches_and_coverage(labels: np.ndarray, batch_size: int, m: int) -> None:
    sampler = MPerClassSampler(labels, batch_size, m, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        check_m_per_class(batches, labels, batch_size, m)
        assert covered(batches) == set(range(labels.size)), f"epoch {epoch} misses samples"


def test_m_per_class_epoch_length_formula(labels: np.ndarray) -> None:
    sizes = np.array(list(Counter(labels.tolist()).values()))
    chunks = -(-sizes // 4)
    sampler = MPerClassSampler(labels, 32, 4)
    assert len(sampler) == max(-(-chunks.sum() // 8), chunks.max())
    assert len(list(sampler)) == len(sampler)


def test_m_per_class_dominant_class_appears_once_per_batch() -> None:
    labels = np.concatenate([make_labels(20), np.full(400, 5)])  # class 5 holds 100 chunks of 4
    sampler = MPerClassSampler(labels, 16, 4, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 100
    check_m_per_class(batches, labels, 16, 4)
    assert all((labels[b] == 5).sum() == 4 for b in batches)
    assert covered(batches) == set(range(labels.size))


def test_m_per_class_exactly_enough_classes() -> None:
    labels = make_labels(num_classes=8, low=5, high=13)
    sampler = MPerClassSampler(labels, 32, 4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        check_m_per_class(batches, labels, 32, 4)
        assert all(set(labels[b].tolist()) == set(labels.tolist()) for b in batches)
        assert covered(batches) == set(range(labels.size))


def test_m_per_class_is_deterministic_and_changes_with_epoch_and_seed(labels: np.ndarray) -> None:
    first = MPerClassSampler(labels, 32, 4, seed=11)
    second = MPerClassSampler(labels, 32, 4, seed=11)
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    assert list(first) == list(first)  # iterating again repeats the epoch
    epoch_two = list(first)
    first.set_epoch(3)
    assert list(first) != epoch_two
    assert list(MPerClassSampler(labels, 32, 4, seed=12)) != list(MPerClassSampler(labels, 32, 4, seed=11))


def test_samplers_leave_global_generators_alone(labels: np.ndarray) -> None:
    np.random.seed(123)
    torch.manual_seed(123)
    list(MPerClassSampler(labels, 32, 4))
    list(HierarchicalSampler(labels, make_super_labels(labels, 3), 32, 4))
    after = np.random.random(4), torch.rand(4)
    np.random.seed(123)
    torch.manual_seed(123)
    assert (np.random.random(4) == after[0]).all(), "the sampler consumed the global numpy generator"
    assert torch.equal(torch.rand(4), after[1]), "the sampler consumed the global torch generator"
    # and the global seed does not influence the batches
    np.random.seed(7)
    torch.manual_seed(7)
    again = list(MPerClassSampler(labels, 32, 4))
    np.random.seed(8)
    torch.manual_seed(8)
    assert list(MPerClassSampler(labels, 32, 4)) == again


def test_label_containers_give_identical_batches(labels: np.ndarray) -> None:
    reference = list(MPerClassSampler(labels, 32, 4, seed=5))
    small = labels - labels.min()  # fits int32 / a list of ints; same partition into classes
    for container in (labels.tolist(), torch.from_numpy(labels), small.astype(np.int32), torch.tensor(small)):
        sampler = MPerClassSampler(container, 32, 4, seed=5)
        assert sampler.labels.dtype == np.int64
        assert list(sampler) == reference


def test_labels_above_2_pow_24_stay_distinct() -> None:
    # 2**24 and 2**24 + 1 are equal in float32; as int64 they must stay two classes
    labels = np.repeat(np.array([2**24, 2**24 + 1, 2**40, 2**40 + 1]), 4)
    batches = list(MPerClassSampler(labels, 8, 4))
    assert len(batches) == 2
    check_m_per_class(batches, labels, 8, 4)


def test_works_as_dataloader_batch_sampler(labels: np.ndarray) -> None:
    sampler = MPerClassSampler(labels, 32, 4, seed=2)
    dataset = TensorDataset(torch.arange(labels.size), torch.from_numpy(labels))
    loaded = [(index.tolist(), target) for index, target in DataLoader(dataset, batch_sampler=sampler)]
    assert [index for index, _ in loaded] == list(sampler)
    assert all(torch.equal(target, torch.from_numpy(labels[index])) for index, target in loaded)


# ------------------------------------------------------------------------------------------------- DDP


@pytest.mark.parametrize("kind", ["m_per_class", "hierarchical"])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_ddp_ranks_split_the_global_batches(labels: np.ndarray, kind: str, world_size: int) -> None:
    supers = make_super_labels(labels, 3)

    def build(rank: int, world: int) -> MPerClassSampler | HierarchicalSampler:
        if kind == "m_per_class":
            sampler: MPerClassSampler | HierarchicalSampler = MPerClassSampler(
                labels, 32, 4, seed=9, rank=rank, world_size=world
            )
        else:
            sampler = HierarchicalSampler(labels, supers, 32, 4, seed=9, rank=rank, world_size=world)
        sampler.set_epoch(4)
        return sampler

    single = list(build(0, 1))
    per_rank = [list(build(rank, world_size)) for rank in range(world_size)]
    lengths = {len(build(rank, world_size)) for rank in range(world_size)}
    assert lengths == {-(-len(single) // world_size)}, "ranks must yield equally many batches"
    assert [len(batches) for batches in per_rank] == [lengths.pop()] * world_size
    assert covered([b for batches in per_rank for b in batches]) == set(range(labels.size))
    # rank r takes global batches r, r + world_size, ...; the list wraps around to pad the last round
    padded = single + single[: (-len(single)) % world_size]
    for rank, batches in enumerate(per_rank):
        assert batches == padded[rank::world_size]


def test_ddp_more_ranks_than_batches() -> None:
    labels = np.repeat(np.arange(4), 4)
    per_rank = [list(MPerClassSampler(labels, 8, 4, rank=r, world_size=5)) for r in range(5)]
    assert [len(b) for b in per_rank] == [1] * 5
    assert covered([b for batches in per_rank for b in batches]) == set(range(16))


def test_rank_and_world_size_default_to_a_world_of_one_outside_torch_distributed(labels: np.ndarray) -> None:
    # inside a process group they default to its rank and size: tests/test_distributed_samplers.py
    sampler = MPerClassSampler(labels, 32, 4)
    assert (sampler.rank, sampler.world_size) == (0, 1)
    hierarchical = HierarchicalSampler(labels, make_super_labels(labels, 2), 32, 4)
    assert (hierarchical.rank, hierarchical.world_size) == (0, 1)


# ---------------------------------------------------------------------------------------------- small classes


def test_small_classes_error_by_default() -> None:
    labels = make_labels(num_small=5)
    with pytest.raises(
        ValueError, match=r"5 of 125 classes have fewer than m=4 samples \(the smallest has \d\)"
    ):
        MPerClassSampler(labels, 32, 4)
    with pytest.raises(ValueError, match="small_classes='replace'"):
        HierarchicalSampler(labels, make_super_labels(labels, 2), 32, 4)


def test_small_classes_replace_samples_with_replacement() -> None:
    labels = make_labels(num_small=10, seed=4)
    sizes = Counter(labels.tolist())
    sampler = MPerClassSampler(labels, 32, 4, small_classes="replace", seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        check_m_per_class(batches, labels, 32, 4, replace_ok=True)
        assert covered(batches) == set(range(labels.size))
    groups = np.concatenate([np.asarray(b).reshape(-1, 4) for b in batches])
    small_groups = [g for g in groups if sizes[int(labels[g[0]])] < 4]
    assert small_groups, "small classes must be sampled"
    for group in small_groups:  # all the members of the class, then repeats of them
        assert set(group.tolist()) == set(np.flatnonzero(labels == labels[group[0]]).tolist())


def test_small_classes_drop_excludes_them() -> None:
    labels = make_labels(num_small=10, seed=4)
    sizes = Counter(labels.tolist())
    kept = {i for i, label in enumerate(labels.tolist()) if sizes[label] >= 4}
    sampler = MPerClassSampler(labels, 32, 4, small_classes="drop")
    assert sampler.table.num_classes == 120
    batches = list(sampler)
    check_m_per_class(batches, labels, 32, 4)
    assert covered(batches) == kept


def test_drop_leaving_too_few_classes_is_reported() -> None:
    labels = np.concatenate([np.repeat(np.arange(6), 4), np.arange(10, 20)])  # 6 full classes, 10 singletons
    with pytest.raises(ValueError, match=r"labels has 6 classes after dropping 10 classes.*needs 8 distinct"):
        MPerClassSampler(labels, 32, 4, small_classes="drop")


# ----------------------------------------------------------------------------------------------- hierarchical


@pytest.mark.parametrize(("batch_size", "m", "num_supers"), [(32, 4, 4), (16, 2, 2), (24, 3, 5)])
def test_hierarchical_batches_and_coverage(
    labels: np.ndarray, batch_size: int, m: int, num_supers: int
) -> None:
    supers = make_super_labels(labels, num_supers)
    sampler = HierarchicalSampler(labels, supers, batch_size, m, seed=2)
    pair_counts: Counter[tuple[int, int]] = Counter()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        check_hierarchical(batches, labels, supers, batch_size, m)
        assert covered(batches) == set(range(labels.size)), f"epoch {epoch} misses samples"
        half = batch_size // 2
        pair_counts.update(
            (min(supers[b[0]], supers[b[half]]), max(supers[b[0]], supers[b[half]])) for b in batches
        )
    assert len(pair_counts) == num_supers * (num_supers - 1) // 2, "every pair of super-labels should meet"


def test_hierarchical_epoch_length_formula(labels: np.ndarray) -> None:
    supers = make_super_labels(labels, 4)
    sampler = HierarchicalSampler(labels, supers, 32, 4)
    halves = []
    for value in np.unique(supers):
        chunks = -(-np.array(list(Counter(labels[supers == value].tolist()).values())) // 4)
        halves.append(max(-(-chunks.sum() // 4), chunks.max()))
    assert len(sampler) == max(-(-sum(halves) // 2), max(halves))
    assert len(list(sampler)) == len(sampler)


def test_hierarchical_dominant_super_label_gets_fresh_partners(labels: np.ndarray) -> None:
    supers = make_super_labels(labels, 3, weights=[0.8, 0.1, 0.1])
    sampler = HierarchicalSampler(labels, supers, 16, 2, seed=4)
    big = int(np.argmax(sampler.halves_per_super))
    assert 2 * sampler.halves_per_super[big] > sampler.halves_per_super.sum()
    assert len(sampler) == sampler.halves_per_super[big]
    batches = list(sampler)
    check_hierarchical(batches, labels, supers, 16, 2)
    assert covered(batches) == set(range(labels.size))
    assert all(sampler.super_values[big] in (supers[b[0]], supers[b[8]]) for b in batches)
    # the dominant super-label is not always the first half
    assert {bool(supers[b[0]] == sampler.super_values[big]) for b in batches} == {True, False}


def test_hierarchical_odd_number_of_halves_is_completed() -> None:
    labels = np.repeat(
        np.arange(12), 4
    )  # 12 classes of one chunk: halves of 2 chunks -> 2 + 2 + 2 = 6 halves
    supers = np.repeat(np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]), 4)
    sampler = HierarchicalSampler(labels, supers[: 12 * 4], 16, 4)
    assert list(sampler.halves_per_super) == [2, 2, 2] and sampler.fresh_halves == 0 and len(sampler) == 3
    labels, supers = labels[: 10 * 4], np.repeat(np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]), 4)
    sampler = HierarchicalSampler(labels, supers, 16, 4, seed=3)
    assert list(sampler.halves_per_super) == [2, 2, 1] and sampler.fresh_halves == 1 and len(sampler) == 3
    for epoch in range(5):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        check_hierarchical(batches, labels, supers, 16, 4)
        assert covered(batches) == set(range(labels.size))


def test_hierarchical_small_classes_replace_and_drop() -> None:
    labels = make_labels(num_small=12, seed=6)
    supers = make_super_labels(labels, 3)
    sizes = Counter(labels.tolist())
    replace = HierarchicalSampler(labels, supers, 32, 4, small_classes="replace")
    batches = list(replace)
    check_hierarchical(batches, labels, supers, 32, 4, replace_ok=True)
    assert covered(batches) == set(range(labels.size))
    drop = HierarchicalSampler(labels, supers, 32, 4, small_classes="drop")
    batches = list(drop)
    check_hierarchical(batches, labels, supers, 32, 4)
    assert covered(batches) == {i for i, label in enumerate(labels.tolist()) if sizes[label] >= 4}


def test_hierarchical_is_deterministic_and_changes_with_epoch(labels: np.ndarray) -> None:
    supers = make_super_labels(labels, 4)
    first, second = (HierarchicalSampler(labels, supers, 32, 4, seed=1) for _ in range(2))
    first.set_epoch(5)
    second.set_epoch(5)
    assert list(first) == list(second)
    first.set_epoch(6)
    assert list(first) != list(second)


def test_epochs_over_60k_samples_keep_the_layout_and_cover_everything() -> None:
    """A Stanford-Online-Products-sized epoch (timed in benchmarks/bench_samplers.py), checked vectorised."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 11_318, 60_000)
    supers = labels % 12
    for sampler in (
        HierarchicalSampler(labels, supers, 32, 4, small_classes="replace"),
        MPerClassSampler(labels, 32, 4, small_classes="replace"),
    ):
        batches = np.array(list(sampler))
        assert batches.shape == (len(sampler), 32)
        assert np.unique(batches).size == 60_000  # every sample at least once
        groups = labels[batches].reshape(len(batches), 8, 4)
        assert (groups == groups[..., :1]).all()  # runs of m = 4 indices of one class
        classes = np.sort(groups[..., 0], axis=1)
        assert (classes[:, 1:] != classes[:, :-1]).all()  # distinct classes within a batch
        if isinstance(sampler, HierarchicalSampler):
            halves = supers[batches].reshape(len(batches), 2, 16)
            assert (halves == halves[..., :1]).all() and (halves[:, 0, 0] != halves[:, 1, 0]).all()


def test_cluster_sampler_update_labels_requires_one_label_per_sample() -> None:
    labels = np.repeat(np.arange(10), 6)
    sampler = ClusterBatchSampler(labels, batch_size=8, m=4, seed=0)
    before = list(sampler)
    with pytest.raises(ValueError, match="labels has 59 entries, but the sampler was built for 60"):
        sampler.update_labels(labels[:-1])  # would silently train on a subset
    with pytest.raises(ValueError, match="labels has 61 entries, but the sampler was built for 60"):
        sampler.update_labels(np.append(labels, 0))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        sampler.update_labels(labels.astype(np.float32))
    negative = labels.copy()
    negative[7] = -1
    with pytest.raises(ValueError, match="non-negative cluster ids, got -1 at index 7"):
        sampler.update_labels(negative)
    with pytest.raises(ValueError, match="non-negative cluster ids"):
        ClusterBatchSampler(negative, batch_size=8, m=4)
    with pytest.raises(ValueError, match="needs 2 distinct classes"):
        sampler.update_labels(np.zeros_like(labels))
    assert list(sampler) == before  # a refused update leaves the sampler as it was
    sampler.update_labels(labels + 5)
    assert {label for batch in sampler for _, label in batch} == set(range(5, 15))


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.array([0.0, 1.0, 2.0, 3.0]), TypeError, "labels must have an integer dtype.*float64"),
        ([0.5, 1, 2], TypeError, "labels must have an integer dtype"),
        (torch.tensor([0.0, 1.0]), TypeError, "labels must have an integer dtype.*torch.float32"),
        (torch.tensor([True, False]), TypeError, "labels must have an integer dtype.*torch.bool"),
        (np.array([True, False]), TypeError, "labels must have an integer dtype.*bool"),
        (
            np.zeros((4, 2), dtype=np.int64),
            ValueError,
            r"labels must be 1-D \(num_items,\), got shape \(4, 2\)",
        ),
        ([], ValueError, "labels is empty"),
        ("0123", TypeError, "labels must be a torch.Tensor or a numpy array"),
        (7, TypeError, "labels must be a torch.Tensor or a numpy array"),
        ([[0, 1], [2]], TypeError, "labels must be a rectangular array"),
    ],
)
def test_bad_labels(bad: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        MPerClassSampler(bad, 8, 2)


def test_bad_super_labels(labels: np.ndarray) -> None:
    supers = make_super_labels(labels, 2)
    with pytest.raises(
        ValueError, match=f"super_labels has {labels.size - 1} entries, expected {labels.size}"
    ):
        HierarchicalSampler(labels, supers[:-1], 32, 4)
    with pytest.raises(TypeError, match="super_labels must have an integer dtype"):
        HierarchicalSampler(labels, supers.astype(np.float32), 32, 4)
    with pytest.raises(ValueError, match=r"super_labels has 1 distinct value.*at least 2"):
        HierarchicalSampler(labels, np.zeros_like(labels), 32, 4)
    split = supers.copy()
    split[np.flatnonzero(labels == labels[0])[0]] += 1  # one sample of a class moves to another super-label
    with pytest.raises(ValueError, match=rf"constant within each class.*1 classes.*class {labels[0]}"):
        HierarchicalSampler(labels, split, 32, 4)


def test_super_label_with_too_few_classes(labels: np.ndarray) -> None:
    supers = make_super_labels(labels, 2)
    supers[labels == labels[0]] = 999  # a third super-label holding a single class
    with pytest.raises(
        ValueError, match=r"at least \(batch_size // 2\) // m = 4 classes.*1 of 3 super-labels.*999 has 1"
    ):
        HierarchicalSampler(labels, supers, 32, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 30, "m": 4}, ValueError, r"batch_size \(30\) must be divisible by m \(4\)"),
        ({"batch_size": 0, "m": 4}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": 32, "m": -1}, ValueError, "m must be >= 1, got -1"),
        ({"batch_size": 32.0, "m": 4}, TypeError, "batch_size must be an int, got float"),
        ({"batch_size": 32, "m": True}, TypeError, "m must be an int, got bool"),
        (
            {"batch_size": 4 * 200, "m": 4},
            ValueError,
            "labels has 120 classes, but .* needs 200 distinct classes",
        ),
        (
            {"small_classes": "skip"},
            ValueError,
            r"small_classes must be one of \['error', 'replace', 'drop'\]",
        ),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"rank": 2, "world_size": 2}, ValueError, r"0 <= rank < world_size=2, got rank=2"),
        ({"rank": -1, "world_size": 2}, ValueError, "got rank=-1"),
        ({"rank": 0, "world_size": 0}, ValueError, "world_size must be >= 1"),
    ],
)
def test_bad_m_per_class_arguments(
    labels: np.ndarray, kwargs: dict, error: type[Exception], message: str
) -> None:
    kwargs = {"batch_size": 32, "m": 4, **kwargs}
    with pytest.raises(error, match=message):
        MPerClassSampler(labels, **kwargs)


def test_bad_hierarchical_sizes(labels: np.ndarray) -> None:
    supers = make_super_labels(labels, 2)
    with pytest.raises(ValueError, match=r"batch_size \(36\) must be divisible by 2\*m \(8\).*half-batch"):
        HierarchicalSampler(labels, supers, 36, 4)
    with pytest.raises(ValueError, match="rank=3"):
        HierarchicalSampler(labels, supers, 32, 4, rank=3, world_size=3)


def test_bad_epoch(labels: np.ndarray) -> None:
    sampler = MPerClassSampler(labels, 32, 4)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch must be an int"):
        sampler.set_epoch(1.0)  # type: ignore[arg-type]
