"""Loss forward+backward: objretrieval vs pytorch-metric-learning, and ContextualLoss vs the official code.

Every pair runs in this one process on the same embeddings (dim 512, four per class, float32, CPU), at
batch 128, 512 and 2048: median time of a forward+backward step and its peak resident memory (VmHWM above
the baseline, reset between runs). Deterministic pairs also print the relative difference of the two values.

The official contextual-similarity code is not part of this repository. Point --official-contextual at a
checkout of github.com/Chris210634/metric-learning-using-contextual-similarity; its ``.cuda()`` calls are made
no-ops for the CPU run. Without it, that comparison is skipped.

    uv run --group bench python benchmarks/bench_losses.py --official-contextual /path/to/checkout
    uv run --group bench python benchmarks/bench_losses.py --batches 128 512     # quicker
    uv run --group bench python benchmarks/bench_losses.py --device cuda --batches 512 2048 8192

On CUDA the step runs under ``torch.autocast(float16)`` and memory is the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _harness import timed

from objretrieval import losses, miners

DIM = 512


def make_batch(batch: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    labels = torch.arange(batch // 4).repeat_interleave(4)
    centres = torch.randn(batch // 4, DIM, generator=g)
    x = centres[labels] + 2.5 * torch.randn(batch, DIM, generator=g)  # classes overlap: most losses active
    return x.to(dtype), labels


def step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> Callable[[], float]:
    """One forward + backward; on CUDA under float16 autocast (the losses compute in float32 inside)."""

    def run() -> float:
        emb = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.is_cuda):
            value = loss_fn(emb, y)
        value.backward()
        return float(value.detach())  # synchronises the device

    return run


def pml_pairs(num_classes: int, device: torch.device) -> dict[str, tuple[Callable, Callable, bool]]:
    """name -> (ours, PML, deterministic) loss functions of (embeddings, labels)."""
    from pytorch_metric_learning import distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning import reducers as pml_reducers

    ours_contrastive = losses.ContrastiveLoss(0.9, 0.6)
    pml_contrastive = pml_losses.ContrastiveLoss(0.9, 0.6, distance=distances.CosineSimilarity())
    ours_contrastive_mean = losses.ContrastiveLoss(0.9, 0.6, reduction="mean")
    pml_contrastive_mean = pml_losses.ContrastiveLoss(
        0.9, 0.6, distance=distances.CosineSimilarity(), reducer=pml_reducers.MeanReducer()
    )
    ours_triplet = losses.TripletMarginLoss(margin=0.05)
    pml_triplet = pml_losses.TripletMarginLoss(margin=0.05)
    ours_cosine = losses.TripletMarginLoss(margin=0.05, distance="cosine")
    pml_cosine = pml_losses.TripletMarginLoss(margin=0.05, distance=distances.CosineSimilarity())
    ours_semihard = losses.TripletMarginLoss(margin=0.05, selection="semihard")
    pml_semihard_miner = pml_miners.TripletMarginMiner(margin=0.05, type_of_triplets="semihard")
    ours_ms, ours_ms_miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    pml_ms, pml_ms_miner = pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner()
    ours_pa = losses.ProxyAnchorLoss(num_classes, DIM)
    pml_pa = pml_losses.ProxyAnchorLoss(num_classes, DIM, margin=0.1, alpha=32)
    pml_pa.proxies.data.copy_(ours_pa.proxies.data)
    ours_margin = losses.MarginLoss(num_classes)
    ours_dws = miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    pml_margin = pml_losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=True, num_classes=num_classes)
    pml_dws = pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    for module in (ours_pa, pml_pa, ours_margin, pml_margin):
        module.to(device)
    return {
        "contrastive": (ours_contrastive, pml_contrastive, True),
        "contrastive (mean)": (ours_contrastive_mean, pml_contrastive_mean, True),
        "triplet": (ours_triplet, pml_triplet, True),
        "triplet (cosine)": (ours_cosine, pml_cosine, True),
        "triplet+semihard": (ours_semihard, lambda x, y: pml_triplet(x, y, pml_semihard_miner(x, y)), True),
        "multi-similarity+miner": (
            lambda x, y: ours_ms(x, y, ours_ms_miner(x, y)),
            lambda x, y: pml_ms(x, y, pml_ms_miner(x, y)),
            True,
        ),
        "proxy-anchor": (ours_pa, pml_pa, True),
        "supcon": (losses.SupConLoss(), pml_losses.SupConLoss(), True),
        "margin+distance-weighted": (
            lambda x, y: ours_margin(x, y, ours_dws(x, y)),
            lambda x, y: pml_margin(x, y, pml_dws(x, y)),
            False,
        ),
    }


@contextlib.contextmanager
def cuda_calls_are_noops() -> Iterator[None]:
    """The official code calls ``.cuda()`` on tensors and modules; run it on the CPU instead."""
    tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda  # type: ignore[method-assign]


def official_hybrid(checkout: Path) -> Callable:
    """The official 224x224 Hybrid loss with the CUB command's settings, plus its additive regulariser."""
    sys.path.insert(0, str(checkout / "224x224"))
    official = importlib.import_module("losses")
    hybrid = official.HybridLoss(pos_margin=0.75, neg_margin=0.6, lam=0.05, k=4, eps=0.04)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with cuda_calls_are_noops():
            return hybrid(x, y) + 0.1 * official.get_reg_loss(x, y, 0.3)

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--official-contextual", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    header = (
        f"{'loss':<26}{'batch':>6}{'ours s':>10}{'ref s':>10}{'speedup':>9}{'ours MiB':>10}{'ref MiB':>9}"
        f"{'rel diff':>10}"
    )
    speedups: dict[tuple[str, int], float] = {}
    memory_ratios: dict[tuple[str, int], float] = {}
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, {where}, dim {DIM}, 4 per class\n")
    print("vs pytorch-metric-learning")
    print(header)
    for batch in args.batches:
        x, y = (t.to(device) for t in make_batch(batch))
        for name, (ours, ref, deterministic) in pml_pairs(batch // 4, device).items():
            ours_value, ours_s, ours_mib = timed(step(ours, x, y), device)
            ref_value, ref_s, ref_mib = timed(step(ref, x, y), device, budget_s=20.0)
            rel = abs(ours_value - ref_value) / max(abs(ref_value), 1e-12)
            diff = f"{rel:.1e}" if deterministic else "random"
            speedups[name, batch] = ref_s / ours_s
            memory_ratios[name, batch] = ours_mib / max(ref_mib, 1.0)
            print(
                f"{name:<26}{batch:>6}{ours_s:>10.4f}{ref_s:>10.4f}{ref_s / ours_s:>8.1f}x"
                f"{ours_mib:>10.0f}{ref_mib:>9.0f}{diff:>10}"
            )

    fp16_batch = 512
    x16, y16 = (t.to(device) for t in make_batch(fp16_batch, torch.float16))
    ours_t, pml_t, _ = pml_pairs(fp16_batch // 4, device)["triplet"]
    _, ours_s, ours_mib = timed(step(ours_t, x16, y16), device)
    _, ref_s, ref_mib = timed(step(pml_t, x16, y16), device, budget_s=20.0)
    fp16_speedup = ref_s / ours_s
    print(
        f"\nfloat16 embeddings, triplet, batch {fp16_batch}: ours {ours_s:.4f} s / {ours_mib:.0f} MiB, PML "
        f"{ref_s:.4f} s / {ref_mib:.0f} MiB, speedup {fp16_speedup:.1f}x"
    )

    if args.official_contextual is not None:
        print("\nContextualLoss vs the official 224x224 HybridLoss + regulariser (CUB settings)")
        print(header)
        official = official_hybrid(args.official_contextual)
        ours = losses.ContextualLoss.from_preset("cub")
        for batch in args.batches:
            x, y = (t.to(device) for t in make_batch(batch))
            ours_value, ours_s, ours_mib = timed(step(ours, x, y), device)
            ref_value, ref_s, ref_mib = timed(step(official, x, y), device, budget_s=20.0)
            diff = abs(ours_value - ref_value) / abs(ref_value)
            print(
                f"{'contextual (cub)':<26}{batch:>6}{ours_s:>10.4f}{ref_s:>10.4f}{ref_s / ours_s:>8.1f}x"
                f"{ours_mib:>10.0f}{ref_mib:>9.0f}{diff:>10.1e}"
            )

    large = [b for b in args.batches if b >= 512] or args.batches
    min_speedup = min(v for (_, b), v in speedups.items() if b in large)
    max_memory = max(v for (_, b), v in memory_ratios.items() if b in large)
    top = max(args.batches)
    print(
        f"RESULT min_speedup={min_speedup:.2f} semihard_speedup={speedups['triplet+semihard', top]:.2f} "
        f"dws_speedup={speedups['margin+distance-weighted', top]:.2f} fp16_speedup={fp16_speedup:.2f} "
        f"max_memory_ratio={max_memory:.3f}"
    )


if __name__ == "__main__":
    main()
