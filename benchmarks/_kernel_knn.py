"""Benchmark section of the fused similarity + top-k kernel (``objretrieval.kernels.knn.fused_topk``).

On CUDA: 10,000 queries against a 1,000,000 x 768 gallery (inner product of unit rows), k = 100 and 1,024, in
bfloat16 and float32, the kernel against ``torch.mm`` + ``torch.topk`` (per block of queries, so the score
block stays near 2 GiB), timed with CUDA events (median of the repeats after a warm-up). Throughput is the
useful 2 Q N D flops over the time, also as a fraction of the H200's 989 TFLOP/s dense bf16 peak. Agreement is
the share of (query, neighbour) pairs both calls return (not 1 where near-ties fall at the cut).

``quick`` or CPU: tiny shapes; on CPU the kernel runs only under ``TRITON_INTERPRET=1`` (then on still smaller
shapes), otherwise its torch reference path (``backend="torch"``) is what is timed.

    uv run python -c "from benchmarks._kernel_knn import bench; print(bench('cpu', True))"
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from objretrieval.kernels import knn as knn_kernel
from objretrieval.kernels.dispatch import triton_interpreting
from objretrieval.kernels.knn import fused_topk

PEAK_BF16_FLOPS = 989e12  # H200 dense bf16 tensor-core peak
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: (queries, gallery rows, dim, ks, dtypes, repeats) per setting.
SHAPES = {
    "full": (10_000, 1_000_000, 768, (100, 1024), ("bf16", "fp32"), 3),
    "quick": (256, 50_000, 128, (100, 1024), ("bf16", "fp32"), 3),
    "cpu": (64, 20_000, 64, (100, 1024), ("fp32",), 3),
    "interpreter": (8, 600, 16, (10,), ("fp32",), 1),
}


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], tuple[Any, float]]:
    """(result of a warm-up run, median seconds of ``repeats`` runs) of a call: CUDA events on a GPU."""

    def run(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
        out = fn()  # warm-up: compilation, allocator
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return out, statistics.median(times)

    return run


def mm_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain baseline: per block of queries, one ``torch.mm`` against the whole gallery and ``torch.topk``."""
    block = max(1, min(len(queries), (1 << 30) // len(gallery)))
    parts = [
        torch.topk(torch.mm(queries[i : i + block], gallery.T), k) for i in range(0, len(queries), block)
    ]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _overlap(a: torch.Tensor, b: torch.Tensor, num_g: int) -> float:
    """Share of the (row, index) pairs of ``a`` that ``b`` holds too."""
    rows = torch.arange(a.shape[0], device=a.device)[:, None] * num_g
    return torch.isin((a + rows).flatten(), (b + rows).flatten()).double().mean().item()


def bench(device: str, quick: bool) -> dict[str, float]:
    """Time the kernel against ``torch.mm`` + ``torch.topk``; returns the RESULT items."""
    dev = torch.device(device)
    interpreting = dev.type != "cuda" and triton_interpreting()
    setting = "interpreter" if interpreting else "cpu" if dev.type != "cuda" else "quick" if quick else "full"
    num_q, num_g, dim, ks, dtypes, repeats = SHAPES[setting]
    backend = "triton" if dev.type == "cuda" or interpreting else "torch"
    timer = _timer(dev)
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(num_g, dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(num_q, dim, generator=gen), dim=1)
    flops = 2 * num_q * num_g * dim
    print(
        f"\n== fused_topk (backend={backend}) vs torch.mm + torch.topk: {num_q:,} queries vs {num_g:,} x {dim} "
        f"(ip) on {dev}"
    )
    print(
        f"  {'dtype':<5} {'k':>5} {'fused':>11} {'mm+topk':>11} {'speed-up':>9} {'TFLOP/s':>8} {'of peak':>8}  agree"
    )
    result: dict[str, float] = {}
    for tag in dtypes:
        q, g = queries.to(dev, DTYPES[tag]), gallery.to(dev, DTYPES[tag])
        for k in ks:
            fused = functools.partial(fused_topk, q, g, k, backend=backend)
            (_, fused_idx), fused_s = timer(fused, repeats)
            (_, ref_idx), ref_s = timer(functools.partial(mm_topk, q, g, k), repeats)
            tflops = flops / fused_s / 1e12
            peak = tflops * 1e12 / PEAK_BF16_FLOPS
            shown = f"{peak:8.1%}" if dev.type == "cuda" and tag == "bf16" else f"{'-':>8}"
            agree = _overlap(fused_idx, ref_idx, num_g)
            print(
                f"  {tag:<5} {k:>5} {fused_s * 1e3:8.2f} ms {ref_s * 1e3:8.2f} ms {ref_s / fused_s:9.2f} "
                f"{tflops:8.2f} {shown}  {agree:.4%}"
            )
            result[f"knn_fused_speedup_k{k}_{tag}"] = ref_s / fused_s
            result[f"knn_fused_tflops_k{k}_{tag}"] = tflops
            if tag == dtypes[0]:  # bf16 where timed: the headline numbers
                result[f"knn_fused_speedup_k{k}"] = ref_s / fused_s
                result[f"knn_fused_peak_fraction_k{k}"] = peak if dev.type == "cuda" else float("nan")
    if dev.type == "cuda":
        q, g = queries.to(dev, torch.bfloat16), gallery.to(dev, torch.bfloat16)
        result.update(_tile_sweep(q, g, timer, repeats, flops))
    for key in ("knn_fused_speedup_k100", "knn_fused_speedup_k1024", "knn_fused_peak_fraction_k100"):
        result.setdefault(key, float("nan"))  # the headline items exist in every setting
    return result


#: (BLOCK_Q, BLOCK_N, num_warps) tried by the GPU run; the first is the module's default. Tiles of 64 query
#: rows let Triton use Hopper's wgmma, but spill registers at sm_90 compile time: only a GPU can tell.
TILES = ((32, 128, 8), (64, 128, 8), (64, 64, 4), (16, 128, 4), (32, 64, 4))


@contextlib.contextmanager
def _tiles(block_q: int, block_n: int, num_warps: int) -> Iterator[None]:
    """The kernel module's tile constants set for the duration of the block."""
    saved = knn_kernel.BLOCK_Q, knn_kernel.BLOCK_N, knn_kernel._NUM_WARPS
    knn_kernel.BLOCK_Q, knn_kernel.BLOCK_N, knn_kernel._NUM_WARPS = block_q, block_n, num_warps
    try:
        yield
    finally:
        knn_kernel.BLOCK_Q, knn_kernel.BLOCK_N, knn_kernel._NUM_WARPS = saved


def _tile_sweep(
    q: torch.Tensor, g: torch.Tensor, timer: Callable, repeats: int, flops: int
) -> dict[str, float]:
    """Seconds of the kernel at k = 100 (bfloat16) for each of :data:`TILES`, to choose the default from."""
    print("  tile sweep, bf16, k=100 (BLOCK_Q x BLOCK_N, warps):")
    result = {}
    for block_q, block_n, num_warps in TILES:
        with _tiles(block_q, block_n, num_warps):
            _, seconds = timer(functools.partial(fused_topk, q, g, 100, backend="triton"), repeats)
        tflops = flops / seconds / 1e12
        print(
            f"    {block_q:>3} x {block_n:<4} {num_warps:>2} warps {seconds * 1e3:9.2f} ms {tflops:8.2f} TFLOP/s"
        )
        result[f"knn_fused_tile{block_q}x{block_n}w{num_warps}_k100_s"] = seconds
    return result
