"""Measurement helpers shared by the benchmark scripts: wall time and peak resident memory of a call.

Time and memory are measured in separate runs, under different glibc malloc settings:

- timing runs keep freed blocks (up to 32 MB) mapped for reuse, the steady state of a training loop;
- the memory run returns every freed block above 128 KB to the OS at once and resets the kernel's resident
  high-water mark (VmHWM) first, so the peak above the baseline belongs to this call alone and does not
  depend on what earlier calls left mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"{field}:\s+(\d+)", f.read())
    assert match is not None, f"/proc/self/status has no {field}"
    return int(match.group(1))


def _malloc_keeps_freed_blocks(keep: bool) -> None:
    threshold = 32 << 20 if keep else 128 << 10
    _libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    _libc.mallopt(_M_TRIM_THRESHOLD, threshold)
    if not keep:
        _libc.malloc_trim(0)


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, peak resident MiB above the resident size at the call) of one run of ``fn``."""
    _malloc_keeps_freed_blocks(False)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _status_kib("VmRSS")
        out = fn()
        return out, (_status_kib("VmHWM") - base) / 1024
    finally:
        _malloc_keeps_freed_blocks(True)


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB) of one run: for long calls, where one run of each suffices."""
    _malloc_keeps_freed_blocks(True)
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    out, peak = peak_memory(fn)
    return out, seconds, peak


def repeat(fn: Callable[[], Any], *, budget_s: float = 3.0, max_runs: int = 7) -> tuple[Any, float, float]:
    """(result, median seconds after a warm-up run, peak MiB of a separate run)."""
    _malloc_keeps_freed_blocks(True)
    start = time.perf_counter()
    fn()  # warm-up
    first = time.perf_counter() - start
    times: list[float] = []
    while not times or (len(times) < max_runs and first + sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    out, peak = peak_memory(fn)
    return out, statistics.median(times), peak


def timed(
    fn: Callable[[], Any], device: Any, *, budget_s: float = 3.0, max_runs: int = 7
) -> tuple[Any, float, float]:
    """:func:`repeat` on a torch device: (result, median seconds, peak MiB).

    Peak memory is resident memory on the CPU and the peak of allocated GPU memory above the start on CUDA;
    ``fn`` must synchronise (return a CPU value) for CUDA timings to be right.
    """
    import torch

    if torch.device(device).type != "cuda":
        return repeat(fn, budget_s=budget_s, max_runs=max_runs)
    fn()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _, seconds, _ = repeat(fn, budget_s=budget_s, max_runs=max_runs)
    return fn(), seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
