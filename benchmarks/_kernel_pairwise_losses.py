"""Tiled pairwise losses (``objretrieval.kernels.pairwise_losses``) against the dense loss classes.

Each loss (contrastive, multi-similarity with its miner's rule, SupCon) runs forward + backward on a batch of
L2-normalised embeddings with 4 samples per class:

- CUDA: the Triton kernels against the dense classes at batch 8,192 x 512 (time ratio tiled / dense, target
  at most 1.5, and the largest relative difference of loss and gradient), and the kernels alone at 65,536 x
  512, where the dense (B, B) float32 logits would be 17 GB (peak loss memory, target under 1 GiB: the
  allocations above the embeddings, their gradient included);
- CPU: the torch tiles against the dense classes on 1,024 x 64 (2,048 x 128 without ``quick``): time ratio
  and peak resident memory ratio.

``quick`` on CUDA: batches 2,048 and 8,192 instead.

    cd benchmarks && uv run python -c "import _kernel_pairwise_losses as b; print(b.bench('cpu', True))"

Returns ``loss_tiled_time_ratio_8192`` and ``loss_tiled_mib_65536`` (the worst loss; per loss with a
``_<loss>`` suffix), ``loss_tiled_max_rel_err`` and, for a sweep of the gradient kernel's tiles on SupCon,
``loss_tiled_time_ratio_8192_supcon_t<tile>_d<feature block>`` on CUDA; ``loss_tiled_time_ratio_cpu`` and
``loss_tiled_memory_ratio_cpu`` (dense peak / tiled peak) on the CPU.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable

import torch
from _harness import timed

import objretrieval.kernels.pairwise_losses as kernels
from objretrieval.kernels.pairwise_losses import (
    tiled_contrastive_loss,
    tiled_multi_similarity_loss,
    tiled_supcon_loss,
)
from objretrieval.losses import ContrastiveLoss, MultiSimilarityLoss, SupConLoss

DIM, PER_CLASS = 512, 4

#: name -> (tiled function taking backend=, the dense loss)
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], torch.nn.Module]] = {
    "contrastive": (tiled_contrastive_loss, ContrastiveLoss()),
    "multi_similarity": (
        lambda x, y, **kw: tiled_multi_similarity_loss(x, y, mining_epsilon=0.1, **kw),
        MultiSimilarityLoss(mining_epsilon=0.1),
    ),
    "supcon": (tiled_supcon_loss, SupConLoss()),
}


def _batch(num: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num, dim, generator=g).to(device).requires_grad_()
    return x, (torch.randperm(num, generator=g) // PER_CLASS).to(device)


def _step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """forward + backward, returning (loss, gradient) on the CPU (which also synchronises)."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(x, y)
        loss.backward()
        assert x.grad is not None
        out = loss.detach().cpu(), x.grad.cpu()
        x.grad = None  # so that each call's peak memory includes its gradient
        return out

    return run


def _rel_err(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest difference of loss and gradient, relative to the largest value of each."""
    return max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, want, strict=True)
    )


def _row(name: str, seconds: float, peak_mib: float) -> None:
    print(f"  {name:<40} {seconds * 1e3:10.1f} ms {peak_mib:10.1f} MiB")


def _bench_cpu(dev: torch.device, quick: bool) -> dict[str, float]:
    num, dim = (1024, 64) if quick else (2048, 128)
    x, y = _batch(num, dim, dev)
    print(f"tiled pairwise losses, batch {num} x {dim}, {dev} (torch tiles vs dense)")
    time_ratios, memory_ratios = [], []
    for name, (tiled, dense) in LOSSES.items():
        want, t_dense, m_dense = timed(_step(dense, x, y), dev, budget_s=1.0, max_runs=3)
        got, t_tiled, m_tiled = timed(
            _step(functools.partial(tiled, backend="torch"), x, y), dev, budget_s=1.0
        )
        _row(f"{name}: dense", t_dense, m_dense)
        _row(f"{name}: torch tiles", t_tiled, m_tiled)
        assert _rel_err(got, want) < 1e-4, name
        time_ratios.append(t_tiled / t_dense)
        memory_ratios.append(m_dense / max(m_tiled, 1e-3))
    return {"loss_tiled_time_ratio_cpu": max(time_ratios), "loss_tiled_memory_ratio_cpu": min(memory_ratios)}


#: (tile rows, largest feature block, warps) of the gradient kernel, tried on SupCon (the heaviest backward):
#: fewer feature blocks recompute the similarities less often, smaller tiles stream the columns more often.
#: Each keeps its accumulator in registers without spills on sm_90 (ptxas -v).
GRADIENT_TILES = [(64, 128, 8), (32, 256, 8), (16, 512, 8)]


def _sweep_gradient_tiles(dev: torch.device, x: torch.Tensor, y: torch.Tensor, default_ratio: float):
    """Time ratios (tiled / dense) of SupCon's Triton path under each of :data:`GRADIENT_TILES`."""
    default_time = timed(_step(functools.partial(tiled_supcon_loss, backend="triton"), x, y), dev)[1]
    saved = kernels._MAX_BLOCK_D, kernels._GRAD_WARPS
    result = {}
    try:
        for tile, block_d, warps in GRADIENT_TILES:
            kernels._MAX_BLOCK_D, kernels._GRAD_WARPS = block_d, warps
            run = functools.partial(tiled_supcon_loss, backend="triton", tile_size=tile)
            _, seconds, peak = timed(_step(run, x, y), dev, budget_s=3.0, max_runs=5)
            # relative to the default configuration's ratio, so that the dense run is not repeated
            ratio = default_ratio * seconds / default_time
            _row(f"supcon: tile {tile}, feature block {block_d}, {warps} warps", seconds, peak)
            result[f"loss_tiled_time_ratio_{x.shape[0]}_supcon_t{tile}_d{block_d}"] = ratio
    finally:
        kernels._MAX_BLOCK_D, kernels._GRAD_WARPS = saved
    return result


def _bench_cuda(dev: torch.device, quick: bool) -> dict[str, float]:
    small, large = (2048, 8192) if quick else (8192, 65536)
    result: dict[str, float] = {}
    errors = []
    x, y = _batch(small, DIM, dev)
    print(f"tiled pairwise losses, batch {small:,} x {DIM}, float32, {torch.cuda.get_device_name(dev)}")
    for name, (tiled, dense) in LOSSES.items():
        want, t_dense, m_dense = timed(_step(dense, x, y), dev, budget_s=3.0, max_runs=5)
        got, t_tiled, m_tiled = timed(
            _step(functools.partial(tiled, backend="triton"), x, y), dev, budget_s=3.0, max_runs=5
        )
        _row(f"{name}: dense", t_dense, m_dense)
        _row(f"{name}: triton tiles", t_tiled, m_tiled)
        errors.append(_rel_err(got, want))
        result[f"loss_tiled_time_ratio_{small}_{name}"] = t_tiled / t_dense
        if t_dense > t_tiled:
            print(
                f"  hint: add to MEASURED['pairwise_loss'] in objretrieval/kernels/dispatch.py: Measurement("
                f"{torch.cuda.get_device_name(dev)!r}, {t_dense / t_tiled:.2f}, "
                f"{datetime.date.today().isoformat()!r})"
            )
    result.update(_sweep_gradient_tiles(dev, x, y, result[f"loss_tiled_time_ratio_{small}_supcon"]))
    del x, y
    x, y = _batch(large, DIM, dev)
    print(
        f"tiled pairwise losses, batch {large:,} x {DIM} (dense logits would be {large**2 * 4 / 2**30:.0f} GiB)"
    )
    for name, (tiled, _) in LOSSES.items():
        _, t_tiled, m_tiled = timed(
            _step(functools.partial(tiled, backend="triton"), x, y), dev, budget_s=5.0, max_runs=3
        )
        _row(f"{name}: triton tiles", t_tiled, m_tiled)
        result[f"loss_tiled_mib_{large}_{name}"] = m_tiled
    result[f"loss_tiled_time_ratio_{small}"] = max(
        result[f"loss_tiled_time_ratio_{small}_{n}"] for n in LOSSES
    )
    result[f"loss_tiled_mib_{large}"] = max(result[f"loss_tiled_mib_{large}_{n}"] for n in LOSSES)
    result["loss_tiled_max_rel_err"] = max(errors)
    print(
        f"  worst time ratio at {small:,}: {result[f'loss_tiled_time_ratio_{small}']:.2f} (target <= 1.5); "
        f"worst loss memory at {large:,}: {result[f'loss_tiled_mib_{large}']:.0f} MiB (target < 1024)"
    )
    return result


def bench(device: str, quick: bool) -> dict[str, float]:
    """Time and memory of the tiled losses against the dense ones; see the module docstring."""
    dev = torch.device(device)
    return _bench_cuda(dev, quick) if dev.type == "cuda" else _bench_cpu(dev, quick)
