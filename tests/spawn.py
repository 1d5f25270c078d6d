"""Run a function in real spawned processes joined by a gloo process group (no mocked collectives).

``run_world(fn, world_size, *args)`` starts ``world_size`` processes with ``torch.multiprocessing`` (spawn),
joins them in a gloo (or nccl) group over TCP on a free local port, calls ``fn(rank, world_size, *args)`` in each with
one intra-op thread, and returns the per-rank results in rank order (anything ``torch.save`` can write). An
exception in any rank fails the call with that rank's traceback; a hang fails it after ``timeout`` seconds.
Spawning costs a few seconds, so a test puts many checks into one call.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TIMEOUT = datetime.timedelta(seconds=120)  # a collective waiting longer than this fails instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, out: str, backend: str, args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    options: dict[str, Any] = {}
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
        options["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=_TIMEOUT,
        **options,
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        del result
        # a DistributedDataParallel reducer still alive when the group is destroyed makes gloo abort the
        # process now and then ("terminate called without an active exception"): collect it first
        gc.collect()
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def run_world(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0, backend: str = "gloo"
) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]``, each computed in its own process
    (``backend="nccl"``: rank r on GPU r)."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out, backend, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        # join returns False each time one rank exits while others still run, and raises if one failed
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
