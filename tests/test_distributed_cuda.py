"""The distributed pieces on a GPU: nccl in a world of one, and gloo ranks exchanging CUDA tensors.

One GPU is enough: nccl runs with one rank (its collectives are then real but trivial), gloo with two ranks
sharing the GPU (every exchange copies through the CPU, ``objretrieval.distributed.world.comm_device``).
Results must equal one process on the same data, as the CPU tests check for gloo on CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from objretrieval.distributed import CrossBatchMemory, DistributedLoss, all_gather_with_grad, sharded_knn
from objretrieval.losses import MultiSimilarityLoss
from objretrieval.metrics import RetrievalEvaluator, RetrievalMetrics
from objretrieval.search import knn
from tests.spawn import run_world

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

N, DIM, METRICS = 300, 16, ["recall@1", "map@r", "map"]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, DIM, generator=g), torch.randint(0, 12, (N,), generator=g)


def _on_gpu(rank: int, world: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    x, y = _data()
    lo, hi = rank * N // world, (rank + 1) * N // world
    mine, labels = x[lo:hi].to(device), y[lo:hi].to(device)
    out: dict[str, Any] = {}
    emb = mine.clone().requires_grad_()
    gathered = all_gather_with_grad(emb)
    (gathered * torch.arange(N, device=device)[:, None]).sum().backward()
    out["gathered"], out["grad"] = gathered.detach().cpu(), emb.grad.cpu()
    emb = mine.clone().requires_grad_()
    out["loss"] = DistributedLoss(MultiSimilarityLoss())(emb, labels).detach().cpu()
    out["knn"] = [t.cpu() for t in sharded_knn(mine, k=5)]
    metrics = RetrievalMetrics(METRICS).to(device)
    metrics.update(mine, labels, indices=torch.arange(lo, hi, device=device))
    out["metrics"] = metrics.compute().metrics
    memory = CrossBatchMemory(MultiSimilarityLoss(), 64)
    memory(mine[:20], labels[:20])
    out["memory"] = [t.cpu() for t in memory.memory()]
    return out


@pytest.mark.parametrize(("backend", "world"), [("nccl", 1), ("gloo", 2)])
def test_distributed_pieces_on_a_gpu_equal_one_process(backend: str, world: int) -> None:
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no nccl")
    results = run_world(_on_gpu, world, backend=backend)
    x, y = _data()
    expected_knn = knn(x.cuda(), k=5)
    expected_metrics = RetrievalEvaluator(METRICS)(x.cuda(), y.cuda()).metrics
    expected_loss = MultiSimilarityLoss()(x.cuda(), y.cuda()).cpu()
    for rank, out in enumerate(results):
        lo, hi = rank * N // world, (rank + 1) * N // world
        assert torch.equal(out["gathered"], x)
        assert torch.equal(out["grad"], world * torch.arange(lo, hi, dtype=x.dtype)[:, None].expand(-1, DIM))
        torch.testing.assert_close(out["loss"], expected_loss)
        assert torch.equal(out["knn"][1], expected_knn.indices[lo:hi].cpu())
        torch.testing.assert_close(out["knn"][0], expected_knn.scores[lo:hi].cpu())
        assert out["metrics"].keys() == expected_metrics.keys()
        for name, value in expected_metrics.items():
            assert out["metrics"][name] == pytest.approx(value, abs=1e-6)
        first = torch.cat([x[r * N // world :][:20] for r in range(world)])
        assert torch.equal(out["memory"][0], first.cuda().cpu())
