"""Kernels of ``objretrieval.kernels`` against their torch references, and the exact-kNN floor, in one run.

The script a first GPU run executes. It reports, with the median and spread of the timed repeats:

- ``hamming_topk``: the Triton kernel vs the torch reference on packed codes (128 bits by default), after
  checking that both return identical neighbours; the speed-up is what ``MEASURED`` in
  ``objretrieval/kernels/dispatch.py`` records per device;
- ``objretrieval.search.knn`` (inner product, gallery on the device) vs ``torch.mm`` + ``torch.topk`` on the
  same inputs, in bfloat16 and float32, at each k: the baseline a fused kNN kernel must beat;
- then each kernel's own section (``--sections``): the fused kNN top-k kernel, the tiled pairwise losses,
  AMES on FlexAttention and the fused AVSL distance, each against its torch/cuBLAS reference on the issue's
  shapes (``benchmarks/_kernel_*.py``).

Throughput is given as a fraction of the H200's peaks where that means something: dense bf16 products
against 989 TFLOP/s, and the Hamming distance matrix (Q x N int32, written once: a lower bound on its memory
traffic) against 4.8 TB/s of HBM.

    uv run python benchmarks/bench_kernels.py                          # CUDA if available: the full sizes
    uv run python benchmarks/bench_kernels.py --device cpu --quick     # seconds on a CPU (Triton skipped)
    uv run python benchmarks/bench_kernels.py --gallery 200000 --knn-k 100

Last line: ``RESULT hamming_speedup=<torch s / triton s> hamming_identical=<1|0> knn_vs_mm_topk_k<k>_<dtype>=<knn
s / mm+topk s> knn_tflops_<dtype>_k<k>=... mm_topk_tflops_<dtype>_k<k>=... max_spread=...`` (``nan`` where skipped).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from objretrieval.kernels import KernelBackend, hamming_topk
from objretrieval.search import knn

PEAK_BF16_FLOPS = 989e12  # H200 dense bf16 tensor-core peak
PEAK_HBM_BYTES = 4.8e12  # H200 HBM3e bandwidth
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAN = float("nan")

#: The other kernels' benchmark sections, ``bench(device, quick) -> RESULT items`` each (benchmarks/_kernel_*.py).
SECTIONS = {
    "fused_knn": "_kernel_knn",
    "pairwise_losses": "_kernel_pairwise_losses",
    "ames_attention": "_kernel_ames_attention",
    "avsl": "_kernel_avsl",
}

#: (full, --quick) defaults of every size option.
SIZES: dict[str, tuple[Any, Any]] = {
    "codes_queries": (10_000, 64),
    "codes_database": (1_000_000, 20_000),
    "bits": (128, 128),
    "hamming_k": (100, 10),
    "knn_queries": (10_000, 64),
    "gallery": (1_000_000, 20_000),
    "dim": (768, 64),
    "knn_k": ("100,1024", "10,100"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, *, budget_s: float, max_runs: int
) -> tuple[Any, float, float]:
    """(result of the warm-up run, median seconds, spread) of ``fn`` on ``device``.

    As ``_harness.repeat``: one warm-up run, then repeats until ``max_runs`` or ``budget_s`` is spent (at least
    one), each ended by a device synchronisation; spread is (max - min) / median over the repeats, nan for one.
    """
    out = fn()  # warm-up: CUDA context, kernel compilation, allocator
    sync(device)
    times: list[float] = []
    while not times or (len(times) < max_runs and sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return out, median, (max(times) - min(times)) / median if len(times) > 1 else NAN


def nanmax(values: list[float]) -> float:
    """The largest of ``values`` that is a number, nan if none is."""
    return max((v for v in values if not math.isnan(v)), default=NAN)


def fmt_time(seconds: float, spread: float) -> str:
    return f"{seconds * 1e3:10.2f} ms  ±{spread / 2:6.1%}"


def random_codes(rows: int, bits: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """(rows, bits / 8) uint8 packed codes, as ``pack_bits`` writes them."""
    return torch.randint(0, 256, (rows, bits // 8), dtype=torch.uint8, generator=gen).to(device)


def triton_skip_reason(device: torch.device) -> str | None:
    """Why the Triton backend is not timed here, or ``None`` when it is."""
    if device.type != "cuda":
        return "Triton needs CUDA; on CPU it runs only under TRITON_INTERPRET=1, far too slow to time"
    try:
        import triton  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    return None


def bench_hamming(args: argparse.Namespace, device: torch.device, timer: Callable) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    q = random_codes(args.codes_queries, args.bits, device, gen)
    db = random_codes(args.codes_database, args.bits, device, gen)
    k = args.hamming_k
    print(
        f"\n== hamming_topk: {args.codes_queries:,} queries vs {args.codes_database:,} codes of {args.bits} "
        f"bits, k={k}, block_size={args.block_size}, {device}"
    )

    def run(backend: KernelBackend) -> Callable[[], Any]:
        return lambda: hamming_topk(q, db, k, backend=backend, block_size=args.block_size)

    matrix_bytes = 4 * args.codes_queries * args.codes_database  # the int32 distance matrix, written once

    def report(name: str, seconds: float, spread: float) -> None:
        pairs = args.codes_queries * args.codes_database / seconds
        bandwidth = matrix_bytes / seconds
        of_peak = f" = {bandwidth / PEAK_HBM_BYTES:6.1%} of HBM peak" if device.type == "cuda" else ""
        print(
            f"  {name:<7}{fmt_time(seconds, spread)}  {pairs / 1e9:9.2f} Gpairs/s  "
            f"distance matrix {bandwidth / 1e12:6.3f} TB/s{of_peak}"
        )

    ref, torch_s, torch_spread = timer(run("torch"))
    report("torch", torch_s, torch_spread)
    result = {"hamming_torch_s": torch_s, "hamming_speedup": NAN, "hamming_identical": NAN}
    spreads = [torch_spread]
    reason = triton_skip_reason(device)
    if reason is not None:
        print(f"  triton  skipped: {reason}")
    else:
        first = run("triton")()  # also compiles the kernel before timing
        identical = torch.equal(first.indices, ref.indices) and torch.equal(first.scores, ref.scores)
        print(f"  triton and torch neighbours identical={int(identical)}")
        _, triton_s, triton_spread = timer(run("triton"))
        report("triton", triton_s, triton_spread)
        speedup = torch_s / triton_s
        spreads.append(triton_spread)
        result.update(hamming_triton_s=triton_s, hamming_speedup=speedup, hamming_identical=float(identical))
        name = torch.cuda.get_device_name(device)
        print(f"  speed-up of triton over torch (torch time / triton time): {speedup:.2f}")
        if speedup > 1.0 and identical:
            print(
                f"  hint: add to MEASURED['hamming_topk'] in objretrieval/kernels/dispatch.py: Measurement("
                f"{name!r}, {speedup:.2f}, {datetime.date.today().isoformat()!r})"
            )
    result["hamming_spread"] = nanmax(spreads)
    return result


def mm_topk(q: torch.Tensor, g: torch.Tensor, k: int, query_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: per query block, one ``torch.mm`` against the whole gallery and ``torch.topk``."""
    parts = [
        torch.topk(torch.mm(q[i : i + query_block], g.T), k, dim=1) for i in range(0, len(q), query_block)
    ]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def overlap(a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """Fraction of the (row, index) pairs of ``a`` also in ``b``: agreement of two top-k sets, ties aside."""
    rows = torch.arange(a.shape[0], device=a.device)[:, None] * n
    return torch.isin((a + rows).flatten(), (b + rows).flatten()).double().mean().item()


def bench_knn(args: argparse.Namespace, device: torch.device, timer: Callable) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, args.dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.knn_queries, args.dim, generator=gen), dim=1)
    flops = 2 * args.knn_queries * args.gallery * args.dim
    # Query rows per product of the reference: a (query_block x N) score matrix of about 4 GiB in float32.
    query_block = max(1, min(args.knn_queries, (1 << 30) // args.gallery))
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    print(
        f"\n== knn (ip, gallery on {device}) vs torch.mm + torch.topk ({query_block:,} queries per product): "
        f"{args.knn_queries:,} queries vs {args.gallery:,} x {args.dim}{', TF32 on' if tf32 else ''}"
    )
    print(
        f"  {'dtype':<5} {'k':>5} {'call':<11} {'median':>13} {'±':>8}  {'TFLOP/s':>8}  {'of bf16 peak':>12}"
    )
    result: dict[str, float] = {}
    spreads = []
    for tag in args.dtypes:
        # The gallery on the device, as the fused kernel will have it; one dtype's copy at a time.
        q, g = queries.to(device, DTYPES[tag]), gallery.to(device, DTYPES[tag])
        for k in args.knn_k:
            ours, knn_s, knn_spread = timer(functools.partial(knn, q, g, k=k, metric="ip", device=device))
            (_, ref_idx), ref_s, ref_spread = timer(functools.partial(mm_topk, q, g, k, query_block))
            spreads += [knn_spread, ref_spread]
            for name, seconds, spread in (("knn", knn_s, knn_spread), ("mm+topk", ref_s, ref_spread)):
                tflops = flops / seconds / 1e12
                on_h200 = tag == "bf16" and device.type == "cuda"  # the peak is a GPU's, and bf16's
                peak = f"{tflops * 1e12 / PEAK_BF16_FLOPS:12.1%}" if on_h200 else f"{'-':>12}"
                print(
                    f"  {tag:<5} {k:>5} {name:<11} {seconds * 1e3:10.2f} ms {spread / 2:7.1%}  {tflops:8.2f}  {peak}"
                )
            agree = overlap(ours.indices, ref_idx, args.gallery)
            print(
                f"  {tag:<5} {k:>5} knn / mm+topk time {knn_s / ref_s:.2f}; neighbour sets overlap {agree:.4%}"
            )
            result[f"knn_vs_mm_topk_k{k}_{tag}"] = knn_s / ref_s
            result[f"knn_tflops_{tag}_k{k}"] = flops / knn_s / 1e12
            result[f"mm_topk_tflops_{tag}_k{k}"] = flops / ref_s / 1e12
    result["knn_spread"] = nanmax(spreads)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds on a CPU")
    for name, (full, quick) in SIZES.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(full),
            default=None,
            help=f"default {full} ({quick} quick)",
        )
    parser.add_argument("--block-size", type=int, default=4096, help="hamming_topk database rows per block")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated subset of bf16,fp32")
    parser.add_argument("--skip-hamming", action="store_true")
    parser.add_argument("--skip-knn", action="store_true")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated kernel sections after Hamming and kNN (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds of repeats per call (3, 1 quick)")
    parser.add_argument("--max-runs", type=int, default=5)
    args = parser.parse_args()
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.knn_k = [int(k) for k in str(args.knn_k).split(",")]
    args.dtypes = args.dtypes.split(",")
    args.sections = [x for x in args.sections.split(",") if x]
    if not set(args.sections) <= set(SECTIONS):
        parser.error(f"--sections must be a subset of {','.join(SECTIONS)}, got {','.join(args.sections)}")
    if args.budget is None:
        args.budget = 1.0 if args.quick else 3.0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.bits % 8:
        parser.error(f"--bits must be a multiple of 8, got {args.bits}")
    if not set(args.dtypes) <= set(DTYPES):
        parser.error(f"--dtypes must be a subset of {','.join(DTYPES)}, got {','.join(args.dtypes)}")
    if args.hamming_k > args.codes_database or max(args.knn_k) > args.gallery:
        parser.error("every k must be at most the database / gallery size")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"objretrieval kernel benchmark on {name}; torch {torch.__version__}; {datetime.date.today().isoformat()}"
    )
    print(
        f"timings: median of up to {args.max_runs} repeats after a warm-up ({args.budget:g} s budget); ± is half"
    )
    print("the (max - min) / median spread over the repeats")

    def timer(fn: Callable[[], Any]) -> tuple[Any, float, float]:
        return time_call(fn, device, budget_s=args.budget, max_runs=args.max_runs)

    result: dict[str, float] = {"hamming_speedup": NAN, "hamming_identical": NAN}
    if not args.skip_hamming:
        result.update(bench_hamming(args, device, timer))
    if not args.skip_knn:
        result.update(bench_knn(args, device, timer))
    for section in args.sections:  # each kernel's own module: its shapes, reference and RESULT items
        print(f"\n== {section} ==")
        module = importlib.import_module(SECTIONS[section])
        result.update(module.bench(args.device, args.quick))
    result["max_spread"] = nanmax([v for key, v in result.items() if key.endswith("_spread")])
    print(f"\nnoise: the largest (max - min) / median over any call's repeats was {result['max_spread']:.1%}")
    print("RESULT " + " ".join(f"{key}={value:.4g}" for key, value in result.items()))


if __name__ == "__main__":
    main()
