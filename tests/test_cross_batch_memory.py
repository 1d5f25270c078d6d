"""CrossBatchMemory: against pytorch-metric-learning's CrossBatchMemory and brute-force pair sums over a
sequence of wrapping batches, the ring's content, checkpoints, errors, and identical queues on 2 and 3
real gloo processes with uneven (and one empty) shards."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from objretrieval.losses import (
    ContextualLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    SmoothAPLoss,
    TripletMarginLoss,
)
from objretrieval.losses.cross_batch_memory import CrossBatchMemory
from objretrieval.miners import MultiSimilarityMiner, TripletMarginMiner
from tests.spawn import run_world

DIM = 8
BATCH_SIZES = (4, 3, 4, 4, 2, 4, 3)  # 24 rows through a memory of 10: wraps twice, at varying offsets


def stream(sizes=BATCH_SIZES, num_classes: int = 4, seed: int = 0):
    """Clustered float64 batches: (embeddings, labels) per step."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, DIM, generator=g, dtype=torch.float64)
    out = []
    for n in sizes:
        y = torch.randint(0, num_classes, (n,), generator=g)
        out.append((centres[y] + 0.8 * torch.randn(n, DIM, generator=g, dtype=torch.float64), y))
    return out


def contrastive_reference(x, y, ref, ref_y, self_cols, pos_margin=0.9, neg_margin=0.6):
    """Mean violating positive hinge + mean violating negative hinge, pairs enumerated one by one."""
    s = F.normalize(x, dim=1) @ F.normalize(ref, dim=1).T
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(len(ref_y)):
            if y[i] == ref_y[j] and j != self_cols[i] and s[i, j] < pos_margin:
                pos.append(pos_margin - s[i, j])
            if y[i] != ref_y[j] and s[i, j] > neg_margin:
                neg.append(s[i, j] - neg_margin)
    mean = lambda v: torch.stack(v).mean() if v else torch.zeros((), dtype=x.dtype)  # noqa: E731
    return mean(pos) + mean(neg)


def multi_similarity_reference(x, y, ref, ref_y, self_cols, alpha=2.0, beta=50.0, base=0.5):
    """Per anchor (1/a) log(1 + sum_pos e^{-a(S-b)}) + (1/b) log(1 + sum_neg e^{b(S-b)}), averaged."""
    s = F.normalize(x, dim=1) @ F.normalize(ref, dim=1).T
    per_anchor = []
    for i in range(len(y)):
        pos = [j for j in range(len(ref_y)) if y[i] == ref_y[j] and j != self_cols[i]]
        neg = [j for j in range(len(ref_y)) if y[i] != ref_y[j]]
        p = torch.log1p(torch.exp(-alpha * (s[i, pos] - base)).sum()) / alpha
        n = torch.log1p(torch.exp(beta * (s[i, neg] - base)).sum()) / beta
        per_anchor.append(p + n)
    return torch.stack(per_anchor).mean()


def pml_pair(name: str):
    cosine = pml_distances.CosineSimilarity()
    if name == "contrastive":
        return ContrastiveLoss(0.9, 0.6), pml_losses.ContrastiveLoss(0.9, 0.6, distance=cosine)
    return MultiSimilarityLoss(2.0, 50.0, 0.5), pml_losses.MultiSimilarityLoss(2.0, 50.0, 0.5)


def run_both(ours: CrossBatchMemory, pml: Callable, batches, **kwargs):
    """Feed both wrappers the same batches; yields (our loss, PML loss, our grad, PML grad) per step."""
    for x, y in batches:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = ours(xa, y, **kwargs), pml(xb, y, **kwargs)
        la.backward()
        lb.backward()
        yield la, lb, xa.grad, xb.grad


# -- single process: values, memory ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_matches_pml_over_wrapping_batches(name: str) -> None:
    loss, pml_loss = pml_pair(name)
    ours = CrossBatchMemory(loss, 10)
    pml = pml_losses.CrossBatchMemory(pml_loss, DIM, memory_size=10)
    for la, lb, ga, gb in run_both(ours, pml, stream()):
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
        # the same ring layout as PML's buffers, slot for slot
        assert torch.equal(ours.embedding_memory, pml.embedding_memory)
        assert torch.equal(ours.label_memory, pml.label_memory)
    assert ours.is_full and ours.num_filled == 10


def test_matches_pml_with_miner() -> None:
    # two rows of each class per batch: every anchor has a positive besides itself, so PML's mining with
    # the self-pair still present (its hardest positive is never the self-pair) selects what ours selects.
    # Batches of 6 mine several pairs: PML's pair losses return 0 when at most one pair of each kind is mined.
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, DIM, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(6):
        y = torch.randperm(5, generator=g)[:3].repeat_interleave(2)
        batches.append((centres[y] + torch.randn(6, DIM, generator=g, dtype=torch.float64), y))
    loss, pml_loss = pml_pair("multi_similarity")
    ours = CrossBatchMemory(loss, 14, miner=MultiSimilarityMiner(0.1))
    pml = pml_losses.CrossBatchMemory(
        pml_loss, DIM, memory_size=14, miner=pml_miners.MultiSimilarityMiner(epsilon=0.1)
    )
    for la, lb, ga, gb in run_both(ours, pml, batches):
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_indices_tuple_adds_batch_pairs_at_their_memory_slots() -> None:
    batches = stream(sizes=(4, 4, 4))
    ours = CrossBatchMemory(MultiSimilarityLoss(), 6, miner=MultiSimilarityMiner(0.1))
    pml = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(), DIM, memory_size=6, miner=pml_miners.MultiSimilarityMiner(0.1)
    )
    write = 0
    for x, y in batches:
        a1, p, a2, n = lmu.get_all_pairs_indices(y)
        keep = a1 != p
        batch_pairs = (a1[keep], p[keep], a2, n)
        slot = (write + torch.arange(4)) % 6
        write = (write + 4) % 6
        # PML reads the indices as memory columns: the reference gets them moved to the batch's slots
        at_slots = (a1[keep], slot[p[keep]], a2, slot[n])
        torch.testing.assert_close(ours(x, y, batch_pairs), pml(x, y, at_slots), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="without a miner"):
        CrossBatchMemory(MultiSimilarityLoss(), 6)(x, y, batch_pairs)


def test_indices_tuple_adds_batch_triplets_at_their_memory_slots() -> None:
    batches = stream(sizes=(5, 5, 5))
    ours = CrossBatchMemory(TripletMarginLoss(0.1), 8, miner=TripletMarginMiner(0.2, "semihard"))
    pml = pml_losses.CrossBatchMemory(
        pml_losses.TripletMarginLoss(margin=0.1),
        DIM,
        memory_size=8,
        miner=pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
    )
    write = 0
    for x, y in batches:
        a, p, n = lmu.get_all_triplets_indices(y)
        slot = (write + torch.arange(5)) % 8
        write = (write + 5) % 8
        got = ours(x, y, (a, p, n))
        torch.testing.assert_close(got, pml(x, y, (a, slot[p], slot[n])), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="the miner yields MinedTriplets but indices_tuple gives MinedPairs"):
        ours(x, y, lmu.get_all_pairs_indices(y))


def test_memory_is_the_last_rows_in_ring_slots() -> None:
    cbm = CrossBatchMemory(ContrastiveLoss(), 10)
    seen_x, seen_y = [], []
    for x, y in stream():
        cbm(x, y)
        seen_x.append(x)
        seen_y.append(y)
        all_x, all_y = torch.cat(seen_x), torch.cat(seen_y)
        kept = min(len(all_y), 10)
        emb, lab = cbm.memory()
        assert torch.equal(emb, all_x[-kept:]) and torch.equal(lab, all_y[-kept:])
        assert cbm.num_filled == kept and cbm.is_full == (len(all_y) >= 10)
        # row j of the stream lives in slot j % size
        for j in range(len(all_y) - kept, len(all_y)):
            assert torch.equal(cbm.embedding_memory[j % 10], all_x[j])
    assert cbm.embedding_memory.dtype == torch.float64


def test_batch_larger_than_memory_keeps_its_last_rows() -> None:
    (x0, y0), (x, y) = stream(sizes=(3, 8))
    cbm = CrossBatchMemory(ContrastiveLoss(0.9, 0.6), 5)
    cbm(x0, y0)
    got = cbm(x, y)
    emb, lab = cbm.memory()
    assert torch.equal(emb, x[-5:]) and torch.equal(lab, y[-5:])
    # rows 0..2 are anchors without their own copy in memory, rows 3..7 sit in columns 0..4
    self_cols = [-1, -1, -1, 0, 1, 2, 3, 4]
    torch.testing.assert_close(got, contrastive_reference(x, y, x[-5:], y[-5:], self_cols))


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_own_copy_is_never_a_positive(name: str) -> None:
    """Each class once per batch: the positives come from earlier batches only."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(4)
    batches = [
        (torch.randn(4, DIM, generator=g, dtype=torch.float64) + 2 * F.one_hot(y, DIM), y) for _ in "ab"
    ]
    reference = contrastive_reference if name == "contrastive" else multi_similarity_reference
    cbm = CrossBatchMemory(pml_pair(name)[0], 8)
    x1, x2 = batches[0][0], batches[1][0]
    torch.testing.assert_close(cbm(x1, y), reference(x1, y, x1, y, [0, 1, 2, 3]))  # negatives only
    torch.testing.assert_close(cbm(x2, y), reference(x2, y, torch.cat([x1, x2]), y.repeat(2), [4, 5, 6, 7]))


def test_batch_of_one_is_not_its_own_positive() -> None:
    # PML 2.9 keeps the self-pair of a one-row batch (its slot range starts and ends at the same index)
    x = torch.randn(3, DIM, dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    cbm = CrossBatchMemory(MultiSimilarityLoss(), 4)
    pml = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), DIM, memory_size=4)
    cbm(x[:2], y[:2]), pml(x[:2], y[:2])
    ours, theirs = cbm(x[2:], y[2:]), pml(x[2:], y[2:])
    torch.testing.assert_close(ours, multi_similarity_reference(x[2:], y[2:], x, y, [2]))
    with_self = multi_similarity_reference(x[2:], y[2:], x, y, [-1])
    torch.testing.assert_close(theirs, with_self)
    assert not torch.isclose(ours, theirs)


def test_reset_empties_the_memory() -> None:
    (x0, y0), (x1, y1) = stream(sizes=(4, 4))
    cbm = CrossBatchMemory(ContrastiveLoss(0.9, 0.6), 6)
    cbm(x0, y0)
    cbm.reset()
    assert cbm.num_filled == 0 and not cbm.is_full and cbm.memory()[0].shape == (0, DIM)
    got = cbm(x1, y1)
    assert torch.equal(cbm.memory()[0], x1)
    torch.testing.assert_close(got, contrastive_reference(x1, y1, x1, y1, [0, 1, 2, 3]))


def test_state_dict_round_trip_resumes_the_queue() -> None:
    batches = stream()
    first = CrossBatchMemory(ContrastiveLoss(0.9, 0.6), 10)
    for x, y in batches[:4]:
        first(x, y)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = CrossBatchMemory(ContrastiveLoss(0.9, 0.6), 10)  # dimension not fixed yet: taken from the file
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.num_filled == first.num_filled and resumed.embedding_memory.dtype == torch.float64
    for x, y in batches[4:]:
        assert torch.equal(first(x, y), resumed(x, y))
        assert torch.equal(first.embedding_memory, resumed.embedding_memory)
        assert torch.equal(first.label_memory, resumed.label_memory)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CrossBatchMemory(ContrastiveLoss(), 12).load_state_dict(first.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        CrossBatchMemory(ContrastiveLoss(), 10, embedding_size=DIM + 1).load_state_dict(first.state_dict())


def test_graph_of_an_earlier_call_survives_the_next_enqueue() -> None:
    # gradient accumulation over two calls: the first call's references must not change under its graph
    (x1, y1), (x2, y2) = stream(sizes=(4, 4))
    cbm = CrossBatchMemory(MultiSimilarityLoss(), 6)
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    (cbm(a, y1) + cbm(b, y2)).backward()
    expected = torch.autograd.grad(multi_similarity_reference(a, y1, x1, y1, [0, 1, 2, 3]), a)[0]
    torch.testing.assert_close(a.grad, expected)


def test_memory_dtype_is_the_compute_dtype() -> None:
    cbm = CrossBatchMemory(ContrastiveLoss(), 4, embedding_size=DIM)
    assert cbm.state_dict()["embedding_memory"].shape == (4, DIM)
    y = torch.tensor([0, 1])
    cbm(torch.randn(2, DIM, dtype=torch.bfloat16), y)
    assert cbm.embedding_memory.dtype == torch.float32
    cbm(torch.randn(2, DIM, dtype=torch.float64), y)  # cast to the memory's dtype once it holds rows
    assert cbm.embedding_memory.dtype == torch.float32
    cbm.reset()
    cbm(torch.randn(2, DIM, dtype=torch.float64), y)
    assert cbm.embedding_memory.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_follows_the_embeddings_to_cuda() -> None:
    batches = stream()
    on_cpu, on_gpu = (
        CrossBatchMemory(ContrastiveLoss(0.9, 0.6), 10),
        CrossBatchMemory(ContrastiveLoss(0.9, 0.6), 10),
    )
    for x, y in batches:
        torch.testing.assert_close(on_gpu(x.cuda(), y.cuda()).cpu(), on_cpu(x, y), rtol=1e-12, atol=1e-12)
    assert on_gpu.embedding_memory.is_cuda and on_gpu.label_memory.is_cuda
    assert torch.equal(on_gpu.embedding_memory.cpu(), on_cpu.embedding_memory)


# -- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [ProxyAnchorLoss(3, DIM), SmoothAPLoss(), ContextualLoss()], ids=type)
def test_refuses_a_loss_without_references(loss) -> None:
    with pytest.raises(ValueError, match=f"loss: {type(loss).__name__} does not accept references"):
        CrossBatchMemory(loss, 8)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="size must be >= 1"):
        CrossBatchMemory(ContrastiveLoss(), 0)
    with pytest.raises(TypeError, match="loss must be an objretrieval MetricLoss"):
        CrossBatchMemory(pml_losses.ContrastiveLoss(), 8)
    with pytest.raises(TypeError, match="miner must be an objretrieval Miner"):
        CrossBatchMemory(ContrastiveLoss(), 8, miner=pml_miners.MultiSimilarityMiner())


def test_bad_batches_raise_and_leave_the_queue_unchanged() -> None:
    cbm = CrossBatchMemory(ContrastiveLoss(), 8)
    y = torch.tensor([0, 1, 0])
    cbm(torch.randn(3, DIM), y)
    before = cbm.embedding_memory.clone()
    nan = torch.randn(3, DIM)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings contains NaN or inf values \(first at row 1\)"):
        cbm(nan, y)
    with pytest.raises(ValueError, match="embeddings have dim 5 but the memory holds dim 8"):
        cbm(torch.randn(3, 5), y)
    with pytest.raises(ValueError, match=r"labels has 2 entries, expected 3 \(one per row of embeddings\)"):
        cbm(torch.randn(3, DIM), y[:2])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        cbm(torch.randn(3, DIM), torch.tensor(0))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        cbm(torch.randn(3, DIM), y.float())
    with pytest.raises(ValueError, match="embeddings is empty"):
        cbm(torch.randn(0, DIM), y[:0])
    assert cbm.num_filled == 3 and torch.equal(cbm.embedding_memory, before)
    # the wrapped loss refusing the batch (one class in the memory) also leaves the queue as it was
    fresh = CrossBatchMemory(ContrastiveLoss(), 8)
    with pytest.raises(ValueError, match="all 3 samples share one class"):
        fresh(torch.randn(3, DIM), torch.zeros(3, dtype=torch.int64))
    assert fresh.num_filled == 0


# -- real processes: identical queues ---------------------------------------------------------------------

MEMORY = 13


def step_sizes(world: int, steps: int = 22) -> list[list[int]]:
    """Uneven rows per rank and step (1..4); on 3 ranks, rank 1 has none at step 5."""
    sizes = [[1 + (t * (r + 2) + r) % 4 for r in range(world)] for t in range(steps)]
    if world == 3:
        sizes[5][1] = 0
    return sizes


def global_batch(t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    y = torch.randint(0, 3, (n,), generator=g)
    return F.one_hot(y, DIM).double() + torch.randn(n, DIM, generator=g, dtype=torch.float64), y


def checksum(cbm: CrossBatchMemory) -> tuple[float, int]:
    """Position-weighted float64 sum of the queue (oldest first) and a position-weighted label hash."""
    emb, lab = cbm.memory()
    weights = torch.arange(1, len(lab) + 1, dtype=torch.float64)[:, None] * torch.linspace(1, 2, DIM).double()
    return float((emb.double() * weights).sum()), int((lab * torch.arange(1, len(lab) + 1) * 7919).sum())


def queue_on_ranks(rank: int, world: int, sizes: list[list[int]]) -> dict:
    cbm = CrossBatchMemory(ContrastiveLoss(0.9, 0.6, reduction="sum"), MEMORY)
    out: dict = {"loss": [], "grad": [], "checksum": []}
    for t, per_rank in enumerate(sizes):
        x, y = global_batch(t, sum(per_rank))
        lo = sum(per_rank[:rank])
        mine = x[lo : lo + per_rank[rank]].clone().requires_grad_()
        loss = cbm(mine, y[lo : lo + per_rank[rank]])
        loss.backward()
        out["loss"].append(loss.detach())
        out["grad"].append(mine.grad if mine.grad is not None else torch.zeros_like(mine))
        out["checksum"].append(checksum(cbm))
    out["memory"] = cbm.memory()
    out["raw"] = (cbm.embedding_memory, cbm.label_memory)
    # a loss averaged over anchors, equal batches: rank gradients / world are the single-process ones
    averaged = CrossBatchMemory(MultiSimilarityLoss(), MEMORY)
    out["ms_grad"] = []
    for t in range(3):
        x, y = global_batch(t, 3 * world)
        mine = x[3 * rank : 3 * rank + 3].clone().requires_grad_()
        averaged(mine, y[3 * rank : 3 * rank + 3]).backward()
        out["ms_grad"].append(mine.grad)
    # a NaN, then a float label, on the last rank only: every rank raises, and no queue moves
    before = checksum(cbm)
    x, y = global_batch(0, 2)
    bad_x = x.clone()
    bad_x[1, 0] = float("nan") if rank == world - 1 else 0.0
    bad_y = y.double() if rank == world - 1 else y
    out["errors"] = []
    for emb, lab in ((bad_x, y), (x, bad_y)):
        try:
            cbm(emb, lab)
            out["errors"].append(None)
        except (TypeError, ValueError) as err:
            out["errors"].append(str(err))
    out["unchanged"] = checksum(cbm) == before
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_queues_identical_across_ranks(world: int) -> None:
    sizes = step_sizes(world)
    ranks = run_world(queue_on_ranks, world, sizes)
    single = CrossBatchMemory(ContrastiveLoss(0.9, 0.6, reduction="sum"), MEMORY)
    for t, per_rank in enumerate(sizes):
        x, y = global_batch(t, sum(per_rank))
        x.requires_grad_()
        loss = single(x, y)
        loss.backward()
        # the rank losses split the single-process sum; each rank's rows get their single-process gradient
        torch.testing.assert_close(sum(r["loss"][t] for r in ranks), loss.detach())
        torch.testing.assert_close(torch.cat([r["grad"][t] for r in ranks]), x.grad)
        for r in ranks:
            assert r["checksum"][t] == checksum(single)
    emb, lab = single.memory()
    assert len(lab) == MEMORY
    for r in ranks:
        assert torch.equal(r["memory"][0], emb) and torch.equal(r["memory"][1], lab)
        assert torch.equal(r["raw"][0], single.embedding_memory)
        assert torch.equal(r["raw"][1], single.label_memory)
    for r in ranks:
        nan, float_labels = r["errors"]
        assert f"CrossBatchMemory: rank {world - 1}: embeddings contains NaN" in nan
        assert f"CrossBatchMemory: rank {world - 1}: labels must have an integer dtype" in float_labels
        assert r["unchanged"]
    averaged = CrossBatchMemory(MultiSimilarityLoss(), MEMORY)
    for t in range(3):
        x, y = global_batch(t, 3 * world)
        x.requires_grad_()
        averaged(x, y).backward()
        torch.testing.assert_close(torch.cat([r["ms_grad"][t] for r in ranks]) / world, x.grad)
