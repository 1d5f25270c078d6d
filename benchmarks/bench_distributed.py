"""Evaluation and losses across processes: ``RetrievalMetrics`` sharded over 1 and 2 gloo processes on CPU,
and the cost of the gather in ``DistributedLoss``.

Evaluation: leave-one-out Recall@1 and MAP@R of N unit vectors (dim 512, about five per class, as
``bench_eval.py``). The parent writes them to a raw float32 file; each rank reads only its contiguous shard
(``np.fromfile`` with an offset, so no other rank's rows ever become resident), calls
``RetrievalMetrics.update`` with the global indices and ``compute()``. Per rank it reports the wall time and
the peak resident memory above the rank's resident size before its shard was read (VmHWM, reset right before,
with freed memory returned to the OS: ``_harness.peak_memory``). This counts everything a rank holds for the
evaluation, shard included, and nothing of the interpreter, torch or the process group, which every process
pays anyway. The 2-process values must equal the 1-process ones exactly.

Loss: forward + backward of ``ContrastiveLoss`` at 512 embeddings per rank (dim 512) on 2 ranks: the plain
loss on the local batch (what a rank computes without ``DistributedLoss``), ``DistributedLoss`` (global
mode), the plain loss on the 1024 global batch (what one process computes, and what global mode computes on
every rank after its gather), and the gather alone (``all_gather_with_grad`` forward and backward). Each form
runs on both ranks at once, so all compete alike for cores; medians of fixed run counts (collectives need
every rank to run as often), the slower rank's median.

    uv run --group bench python benchmarks/bench_distributed.py              # N = 60,000
    uv run --group bench python benchmarks/bench_distributed.py --n 5000 --dim 128

Last line: ``RESULT memory_per_rank_ratio=<2-process peak per rank / 1-process peak> identical=<1|0>
gather_overhead=<DistributedLoss / plain loss on the global batch> vs_local=<DistributedLoss / local loss>``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _harness import measure
from bench_eval import make_embeddings
from torch import nn

from objretrieval.distributed import DistributedLoss, all_gather_with_grad, shard_range
from objretrieval.losses import ContrastiveLoss
from objretrieval.metrics import RetrievalMetrics

METRICS = ["recall@1", "map@r"]
WARMUP, RUNS = 2, 10
LOCAL, DISTRIBUTED = "plain loss, local batch", "DistributedLoss (global), 2 ranks"
GATHER, GLOBAL = "gather alone (forward + backward)", "plain loss, global batch, one process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, threads: int, out: str, args: tuple
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, threads: int, *args: Any) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each in its own spawned process of a gloo group."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry, args=(fn, world, _free_port(), threads, out, args), nprocs=world, start_method="spawn"
        )
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- evaluation ----------------------------------------------------------------------------------------------


def _evaluate(rank: int, world: int, folder: str, n: int, dim: int) -> tuple[dict[str, float], float, float]:
    shard = shard_range(n)

    def run() -> dict[str, float]:
        x = np.fromfile(
            Path(folder) / "x.f32", dtype=np.float32, count=len(shard) * dim, offset=shard.start * dim * 4
        )
        y = np.array(np.load(Path(folder) / "y.npy", mmap_mode="r")[shard.start : shard.stop])  # a copy
        metrics = RetrievalMetrics(METRICS)
        metrics.update(
            torch.from_numpy(x).view(len(shard), dim),
            torch.from_numpy(y),
            indices=torch.arange(shard.start, shard.stop),
        )
        return metrics.compute().metrics

    return measure(run)


def bench_evaluation(n: int, dim: int, seed: int, threads: int) -> tuple[float, bool]:
    x, y = make_embeddings(n, dim, seed)
    with tempfile.TemporaryDirectory() as folder:
        x.numpy().tofile(Path(folder) / "x.f32")
        np.save(Path(folder) / "y.npy", y.numpy())
        del x, y
        runs = {world: spawn(_evaluate, world, threads, folder, n, dim) for world in (1, 2)}
    print(f"\nRetrievalMetrics leave-one-out, N = {n:,}, dim {dim}, {threads} thread(s) per process, gloo")
    print(f"{'processes':<10}{'time (s)':>10}{'peak MiB per rank':>20}  " + "  ".join(METRICS))
    for world, results in runs.items():
        values = results[0][0]
        seconds = max(r[1] for r in results)
        peaks = " / ".join(f"{r[2]:.0f}" for r in results)
        print(f"{world:<10}{seconds:>10.2f}{peaks:>20}  " + "  ".join(f"{values[m]:.7f}" for m in METRICS))
    single, double = runs[1], runs[2]
    identical = all(r[0] == single[0][0] for r in double)
    ratio = max(r[2] for r in double) / single[0][2]
    print(f"peak per rank, 2 processes / 1 process: {ratio:.3f}; values identical (exact): {identical}")
    return ratio, identical


# -- loss ----------------------------------------------------------------------------------------------------


def _batch(rank: int, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch: ``batch // 4`` classes of 4, the classes of different ranks distinct."""
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(rank))
    return x, torch.arange(batch) // 4 + rank * (batch // 4)


def _median_time(step: Callable[[], None]) -> float:
    times = []
    for _ in range(WARMUP + RUNS):
        dist.barrier()  # every rank starts each run together
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def _loss_times(rank: int, world: int, batch: int, dim: int) -> dict[str, float]:
    parts = [_batch(r, batch, dim) for r in range(world)]
    x, y = parts[rank]
    x_all, y_all = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    plain, wrapped = ContrastiveLoss(), DistributedLoss(ContrastiveLoss())

    def step(loss: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
        return lambda: loss(x.clone().requires_grad_(), y).backward()

    return {
        LOCAL: _median_time(step(plain, x, y)),
        DISTRIBUTED: _median_time(step(wrapped, x, y)),
        GATHER: _median_time(lambda: all_gather_with_grad(x.clone().requires_grad_()).sum().backward()),
        # no collective inside: every rank is "one process on the global batch" here, timed while the other
        # rank does the same, so that both forms compete alike for cores and memory bandwidth
        GLOBAL: _median_time(step(plain, x_all, y_all)),
    }


def bench_loss(batch: int, dim: int, threads: int) -> tuple[float, float]:
    per_rank = spawn(_loss_times, 2, threads, batch, dim)
    times = {name: max(r[name] for r in per_rank) for name in per_rank[0]}
    print(f"\nContrastiveLoss forward + backward, {batch} x {dim} per rank, {threads} thread(s) per process")
    for name, seconds in times.items():
        print(f"{name:<44}{1000 * seconds:>10.2f} ms")
    overhead, vs_local = times[DISTRIBUTED] / times[GLOBAL], times[DISTRIBUTED] / times[LOCAL]
    print(
        f"DistributedLoss / one process on the global batch: {overhead:.2f}x; / local loss: {vs_local:.2f}x"
    )
    return overhead, vs_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512, help="loss batch per rank")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    ratio, identical = bench_evaluation(args.n, args.dim, args.seed, args.threads)
    overhead, vs_local = bench_loss(args.batch, args.dim, args.threads)
    print(
        f"RESULT memory_per_rank_ratio={ratio:.3f} identical={int(identical)} gather_overhead={overhead:.2f} "
        f"vs_local={vs_local:.2f}"
    )


if __name__ == "__main__":
    main()
