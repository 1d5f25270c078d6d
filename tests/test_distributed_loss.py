"""DistributedLoss in real gloo process groups (2 and 3 ranks, uneven shards), against one process.

Each rank trains a float64 ``nn.Linear`` (same init everywhere) in a real ``DistributedDataParallel`` on its
shard of one batch; the parent computes what the class docstring says the ranks compute, in one process:
global mode, the loss of the concatenated batch; local mode, ``(1/W) sum_r L_r`` with each shard's rows as
anchors against the whole batch. Model gradients (DDP-averaged) and the loss's own parameters' gradients
must agree to 1e-10. All cases of a world size run in one spawn (a module-scoped fixture).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import objretrieval.losses as losses
from objretrieval.distributed.loss import DistributedLoss
from objretrieval.distributed.world import shard_offsets
from objretrieval.losses import (
    ContextualLoss,
    ContrastiveLoss,
    MarginLoss,
    MetricLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    SupConLoss,
    TripletMarginLoss,
)
from objretrieval.miners import DistanceWeightedMiner, Miner, MultiSimilarityMiner, TripletMarginMiner
from tests.spawn import run_world

SIZES = {2: [7, 5], 3: [6, 3, 5]}
CLASSES, DIM, TOL = 4, 8, 1e-10


def _seeded_dw_miner() -> Miner:
    return DistanceWeightedMiner(generator=torch.Generator().manual_seed(3))  # the same draws on every rank


#: case -> (mode, loss, miner or None)
CASES: dict[str, tuple[str, Callable[[], MetricLoss], Callable[[], Miner] | None]] = {
    "contrastive": ("global", ContrastiveLoss, None),
    "triplet": ("global", TripletMarginLoss, None),
    "multi_similarity": ("global", MultiSimilarityLoss, None),
    "margin_fixed": ("global", MarginLoss, None),
    "margin_learnt": ("global", lambda: MarginLoss(num_classes=CLASSES), None),
    "proxy_anchor": ("global", lambda: ProxyAnchorLoss(CLASSES, DIM), None),
    "proxy_nca": ("global", lambda: ProxyNCALoss(CLASSES, DIM), None),
    "smooth_ap": ("global", SmoothAPLoss, None),
    "roadmap": ("global", ROADMAPLoss, None),
    "contextual": ("global", ContextualLoss, None),
    "supcon": ("global", SupConLoss, None),
    "ms_miner": ("global", MultiSimilarityLoss, MultiSimilarityMiner),
    "triplet_miner": ("global", TripletMarginLoss, TripletMarginMiner),
    "dw_miner": ("global", lambda: MarginLoss(num_classes=CLASSES), _seeded_dw_miner),
    "local_contrastive": ("local", ContrastiveLoss, None),
    "local_triplet": ("local", TripletMarginLoss, None),
    "local_multi_similarity": ("local", MultiSimilarityLoss, None),
    "local_margin_learnt": ("local", lambda: MarginLoss(num_classes=CLASSES), None),
    "local_proxy_anchor": ("local", lambda: ProxyAnchorLoss(CLASSES, DIM), None),
    "local_supcon": ("local", SupConLoss, None),
    "local_triplet_miner": ("local", TripletMarginLoss, TripletMarginMiner),
    # the last rank's anchors have no positive: its loss is the zero of an empty batch, yet its backward must
    # join the others' all-reduces (else DDP's and the gather's collectives would pair up wrongly or hang)
    "local_triplet_empty_rank": ("local", TripletMarginLoss, None),
}


def make_data(sizes: list[int], case: str) -> tuple[Tensor, Tensor]:
    """Inputs (N, DIM) float64 and shuffled labels of CLASSES classes (3-4 per class), N = sum(sizes)."""
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x, y = torch.randn(n, DIM, generator=g, dtype=torch.float64), torch.arange(n) % CLASSES
    y = y[torch.randperm(n, generator=g)]
    if case.endswith("empty_rank"):
        y[n - sizes[-1] :] = 100 + torch.arange(sizes[-1])  # classes of one sample
    return x, y


def build(case: str) -> tuple[nn.Linear, MetricLoss, Miner | None]:
    """The model, loss (float64) and miner of a case, identically initialised in every process."""
    _, make_loss, make_miner = CASES[case]
    torch.manual_seed(1)
    model = nn.Linear(DIM, DIM, dtype=torch.float64)
    loss = make_loss().to(torch.float64)
    return model, loss, None if make_miner is None else make_miner()


def gradients(model: nn.Module, loss: nn.Module) -> dict[str, Tensor]:
    named = [*(("model." + n, p) for n, p in model.named_parameters()), *loss.named_parameters()]
    return {name: p.grad.detach().clone() for name, p in named if p.requires_grad}


def _rank(rank: int, world: int, sizes: list[int]) -> dict[str, Any]:
    """Per case, this rank's loss value and gradients; then the messages of a NaN on one rank and two layout
    mismatches."""
    start = shard_offsets(sizes)[rank]
    rows = slice(start, start + sizes[rank])
    out: dict[str, Any] = {}
    for case, (mode, _, _) in CASES.items():
        x, y = make_data(sizes, case)
        model, loss, miner = build(case)
        ddp = DistributedDataParallel(model)  # kept alive through backward: its reducer averages the grads
        value = DistributedLoss(loss, miner, mode=mode)(ddp(x[rows]), y[rows])
        value.backward()
        out[case] = (value.detach(), gradients(model, loss))
    _, y = make_data(sizes, "")
    criterion = DistributedLoss(ContrastiveLoss())
    nan = torch.randn(sizes[rank], DIM)
    nan[-1, 0] = float("nan") if rank == 1 else 0.0
    for kind, emb in (
        ("nan", nan),
        ("dim", torch.randn(sizes[rank], 6 if rank == 1 else DIM)),
        ("dtype", torch.randn(sizes[rank], DIM, dtype=torch.float32 if rank == 0 else torch.float64)),
    ):
        try:
            criterion(emb, y[rows])
            out[kind] = None
        except ValueError as err:
            out[kind] = str(err)
    torch.manual_seed(
        rank
    )  # proxies initialised differently on every rank: the first call replicates rank 0's
    proxy = DistributedLoss(ProxyAnchorLoss(CLASSES, DIM), mode="local")
    initial = proxy.loss.proxies.detach().clone()
    try:  # a label out of range on one rank: every rank raises (the others would wait in the backward)
        proxy(torch.randn(2, DIM), torch.tensor([0, CLASSES if rank == 1 else 1]))
        out["label_range"] = None
    except ValueError as err:
        out["label_range"] = str(err)
    proxy(torch.randn(2, DIM), torch.tensor([0, 1])).backward()
    out["proxies"] = (initial, proxy.loss.proxies.detach().clone())
    return out


def reference(case: str, sizes: list[int]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Per rank the loss value the class docstring promises, and the gradients, computed in one process."""
    mode = CASES[case][0]
    model, loss, miner = build(case)
    x, y = make_data(sizes, case)
    emb = model(x)
    if mode == "global":
        values = [loss(emb, y, None if miner is None else miner(emb, y))] * len(sizes)
        total = values[0]
    else:
        values = []
        for start, n in zip(shard_offsets(sizes), sizes, strict=True):
            own = torch.arange(start, start + n)
            refs = dict(ref_emb=emb, ref_labels=y, ref_self_index=own) if loss.supports_ref else {}
            anchors, labels = emb[start : start + n], y[start : start + n]
            values.append(
                loss(anchors, labels, None if miner is None else miner(anchors, labels, **refs), **refs)
            )
        total = torch.stack(values).mean()
    total.backward()
    return [v.detach() for v in values], gradients(model, loss)


@pytest.fixture(scope="module", params=sorted(SIZES))
def world(request: pytest.FixtureRequest) -> tuple[list[int], list[dict[str, Any]]]:
    sizes = SIZES[request.param]
    return sizes, run_world(_rank, len(sizes), sizes)


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.filterwarnings("ignore:TripletMarginLoss.*no valid pair:RuntimeWarning")  # the empty rank
@pytest.mark.parametrize("case", CASES)
def test_gradients_and_values_equal_one_process(
    world: tuple[list[int], list[dict[str, Any]]], case: str
) -> None:
    sizes, results = world
    values, grads = reference(case, sizes)
    for r, result in enumerate(results):
        value, rank_grads = result[case]
        assert abs(float(value - values[r])) <= TOL, f"rank {r}"
        assert max_abs_diff(rank_grads, grads) <= TOL, f"rank {r}"
    assert any(float(g.abs().max()) > 0 for g in grads.values())  # a zero gradient would prove nothing


def test_every_rank_raises_when_layouts_differ(world: tuple[list[int], list[dict[str, Any]]]) -> None:
    _, results = world
    for result in results:
        assert "ranks differ in dim: [8, 6" in result["dim"]
        assert "dtype: ['torch.float32', 'torch.float64'" in result["dtype"]
        assert (
            "DistributedLoss: rank 1: embeddings contains NaN or inf" in result["nan"]
        )  # raised on every rank
        assert "rank 1: labels must lie in [0, num_classes=" in result["label_range"]


def test_the_loss_parameters_start_as_rank_0s(world: tuple[list[int], list[dict[str, Any]]]) -> None:
    _, results = world
    rank0_initial = results[0]["proxies"][0]
    assert not torch.equal(results[1]["proxies"][0], rank0_initial)  # the ranks did start apart
    for result in results:
        assert torch.equal(result["proxies"][1], rank0_initial)  # one forward later: rank 0's everywhere


def test_cases_cover_every_metric_loss() -> None:
    exported = {
        obj
        for obj in vars(losses).values()
        if inspect.isclass(obj) and issubclass(obj, MetricLoss) and not inspect.isabstract(obj)
    }
    exported -= {MetricLoss, losses.ParametricLoss}
    covered = {type(build(case)[1]) for case, (mode, _, _) in CASES.items() if mode == "global"}
    assert exported == covered


def _batch(n: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, DIM, generator=g, dtype=torch.float64), torch.arange(n) % 3


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize(
    ("make_loss", "make_miner"),
    [(MultiSimilarityLoss, MultiSimilarityMiner), (lambda: ProxyAnchorLoss(3, DIM).double(), None)],
)
def test_outside_distributed_it_is_the_loss(
    mode: str, make_loss: Callable[[], MetricLoss], make_miner: Any
) -> None:
    x, y = _batch()
    results = []
    for wrap in (False, True):
        torch.manual_seed(0)
        loss, miner = make_loss(), None if make_miner is None else make_miner()
        emb = x.clone().requires_grad_()
        if wrap:
            value = DistributedLoss(loss, miner, mode=mode)(emb, y)
        else:
            value = loss(emb, y, None if miner is None else miner(emb, y))
        value.backward()
        results.append((value.detach(), emb.grad, [p.grad for p in loss.parameters()]))
    (v0, g0, p0), (v1, g1, p1) = results
    assert torch.equal(v0, v1) and torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))


def test_is_a_module_around_the_loss() -> None:
    loss = ProxyAnchorLoss(3, DIM)
    criterion = DistributedLoss(loss, mode="local").to(torch.float64)
    assert loss.proxies.dtype == torch.float64
    assert list(criterion.state_dict()) == ["loss.proxies"]
    assert criterion.param_groups(1e-3) == loss.param_groups(1e-3)
    with pytest.raises(TypeError, match="ContrastiveLoss has no parameters"):
        DistributedLoss(ContrastiveLoss()).param_groups(1e-3)


@pytest.mark.parametrize("loss", [SmoothAPLoss(), ROADMAPLoss(), ContextualLoss()])
def test_local_mode_refuses_losses_without_references(loss: MetricLoss) -> None:
    with pytest.raises(ValueError, match=f"{type(loss).__name__} takes no references.*mode='global'"):
        DistributedLoss(loss, mode="local")


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="loss must be a MetricLoss, got MSELoss"):
        DistributedLoss(nn.MSELoss())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="miner must be"):
        DistributedLoss(ContrastiveLoss(), ContrastiveLoss())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        DistributedLoss(ContrastiveLoss(), mode="both")  # type: ignore[arg-type]
    x, y = _batch()
    with pytest.raises(ValueError, match="labels has 9 entries"):
        DistributedLoss(ContrastiveLoss())(x, y[:9])
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings contains NaN or inf values \(first at row 3\)"):
        DistributedLoss(ContrastiveLoss())(x, y)


@pytest.mark.parametrize(
    "make_loss",
    # reduction="mean" counts the zero-loss triplets, so the self-positives would change the value
    [ContrastiveLoss, lambda: TripletMarginLoss(reduction="mean"), MultiSimilarityLoss],
)
def test_ref_self_index_makes_references_the_batch(make_loss: Callable[[], MetricLoss]) -> None:
    """A batch against a copy of itself, each row's own copy marked, is the batch against itself."""
    x, y = _batch()
    loss = make_loss()
    expected = loss(x, y)
    got = loss(x, y, ref_emb=x.clone(), ref_labels=y, ref_self_index=torch.arange(10))
    assert abs(float(got - expected)) <= 1e-12
    assert abs(float(loss(x, y, ref_emb=x.clone(), ref_labels=y) - expected)) > 1e-6  # self-pairs matter


def test_bad_ref_self_index_raises() -> None:
    x, y = _batch()
    loss = ContrastiveLoss()
    refs = dict(ref_emb=x, ref_labels=y)
    with pytest.raises(ValueError, match=r"ref_self_index must lie in \[-1, 10\)"):
        loss(x, y, **refs, ref_self_index=torch.arange(10) + 1)
    with pytest.raises(ValueError, match="ref_self_index needs ref_emb"):
        loss(x, y, ref_self_index=torch.arange(10))
    with pytest.raises(ValueError, match="ref_self_index has 9 entries"):
        loss(x, y, **refs, ref_self_index=torch.arange(9))
