"""AVSL's fused propagated distance (``objretrieval.kernels.avsl``) against today's torch path.

- CUDA: the Triton kernel against :class:`AVSLScorer`'s blocked torch path (``full_scores``, 256 x 256 pairs
  per block, several (block, block, E) float32 tensors alive at a time) on N = M = 4096 images (1024 with
  ``quick``), 3 levels x 512 nodes, top-128 links: time, peak GPU memory above the inputs, and the largest
  relative difference of the distances;
- CPU: the kernel needs a GPU (or the slow interpreter), so the chunked torch reference (16 rows at a time)
  against the model's unchunked forward, whose (N, M, E) tensors it avoids: time and peak resident memory.

    cd benchmarks && uv run python -c "import _kernel_avsl as b; print(b.bench('cpu', True))"

Returns ``avsl_fused_speedup`` (torch s / kernel s), ``avsl_fused_memory_ratio`` (torch peak / kernel peak) and
``avsl_fused_max_rel_err`` on CUDA; ``avsl_reference_speedup`` and ``avsl_reference_memory_ratio`` on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from _harness import timed

from objretrieval.kernels.avsl import avsl_distance
from objretrieval.models import AttributableSimilarity, AVSLFeatures, AVSLScorer

LEVELS, DIM, TOPK = 3, 512, 128


def _setup(n: int, dim: int, device: torch.device) -> tuple[AttributableSimilarity, AVSLFeatures]:
    """A trained-looking similarity graph and the features of n images, on ``device``."""
    g = torch.Generator().manual_seed(0)
    sim = AttributableSimilarity(dim, LEVELS, topk=min(TOPK, dim)).eval()
    with torch.no_grad():
        sim.links.copy_(torch.randn(sim.links.shape, generator=g))
        sim.reliability_scale.copy_(torch.randn(sim.reliability_scale.shape, generator=g))
        sim.reliability_bias.copy_(0.1 * torch.randn(sim.reliability_bias.shape, generator=g))
    feats = AVSLFeatures(
        tuple(torch.randn(n, dim, generator=g) for _ in range(LEVELS)),
        tuple(0.05 + 0.1 * torch.rand(n, dim, generator=g) for _ in range(LEVELS)),
    )
    return sim.to(device), feats.to(device)


def _synced(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def _row(name: str, seconds: float, peak_mib: float) -> None:
    print(f"  {name:<34} {seconds * 1e3:10.1f} ms {peak_mib:10.1f} MiB")


def bench(device: str, quick: bool) -> dict[str, float]:
    """Time and peak memory of the fused distance against the torch path; see the module docstring."""
    dev = torch.device(device)
    if dev.type != "cuda":
        n, dim = (128, 64) if quick else (384, 128)
        sim, feats = _setup(n, dim, dev)
        print(f"AVSL distance, {n} x {n} images, {LEVELS} levels x {dim} nodes (CPU: torch reference only)")
        want, t_model, m_model = timed(_synced(lambda: sim(feats, feats).final, dev), dev, budget_s=2.0)
        got, t_ref, m_ref = timed(
            _synced(lambda: avsl_distance(sim, feats, feats, chunk_size=16), dev), dev, budget_s=2.0
        )
        _row("model forward (N, M, E) tensors", t_model, m_model)
        _row("chunked torch reference", t_ref, m_ref)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return {
            "avsl_reference_speedup": t_model / t_ref,
            "avsl_reference_memory_ratio": m_model / max(m_ref, 1e-3),
        }

    n = 1024 if quick else 4096
    sim, feats = _setup(n, DIM, dev)
    weights = sim.propagation_weights()
    print(f"AVSL distance, {n} x {n} images, {LEVELS} levels x {DIM} nodes, top-{TOPK} links, float32")
    scorer = AVSLScorer(sim, feats)
    want, t_torch, m_torch = timed(_synced(lambda: -scorer.full_scores(), dev), dev, budget_s=5.0, max_runs=3)
    kernel: Any = _synced(lambda: avsl_distance(sim, feats, feats, weights, backend="triton"), dev)
    got, t_kernel, m_kernel = timed(kernel, dev, budget_s=5.0, max_runs=3)
    _row("torch: AVSLScorer.full_scores", t_torch, m_torch)
    _row("triton: fused kernel", t_kernel, m_kernel)
    err = float(((got - want).abs() / want.abs().clamp_min(1e-6)).max())
    speedup, memory = t_torch / t_kernel, m_torch / max(m_kernel, 1e-3)
    print(f"  speed-up {speedup:.2f}, memory ratio {memory:.1f}, max relative difference {err:.2e}")
    return {"avsl_fused_speedup": speedup, "avsl_fused_memory_ratio": memory, "avsl_fused_max_rel_err": err}
