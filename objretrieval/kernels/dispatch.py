"""Which implementation runs: the torch reference or a Triton kernel, chosen per call by ``backend``.

Every kernel in this package has the same three choices:

- ``"torch"``: the torch reference path, on any device (the default everywhere);
- ``"triton"``: the Triton kernel, on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
  the kernel's first use (the Triton interpreter: slow, that is how the test suite proves the kernels on CPU);
- ``"auto"``: the kernel only on a CUDA device where ``benchmarks/bench_kernels.py --device cuda`` measured it
  faster than the torch reference; the torch reference everywhere else, CPU always.

``auto``'s choice is data, :data:`MEASURED`: one :class:`Measurement` per kernel and GPU, with the ratio and the
date of the run beside it, so a reader sees why a kernel is picked and a new GPU run updates one table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from objretrieval._validation import check_choice

KernelBackend = Literal["torch", "triton", "auto"]


@dataclass(frozen=True)
class Measurement:
    """One GPU benchmark result of a kernel against its torch reference.

    Attributes:
        device_name: ``torch.cuda.get_device_name()`` of the GPU measured.
        speedup: reference time / kernel time at the benchmark's shapes (above 1: the kernel is faster).
        date: ISO date of the run.
        command: the command that measured it.
    """

    device_name: str
    speedup: float
    date: str
    command: str = "uv run --group bench python benchmarks/bench_kernels.py --device cuda"


#: Measured speed-ups per kernel name. Empty until a GPU run exists: ``backend="auto"`` is then the torch
#: reference everywhere. Fill it from the ``hint:`` lines ``benchmarks/bench_kernels.py --device cuda`` prints.
MEASURED: dict[str, tuple[Measurement, ...]] = {
    "hamming_topk": (),
    "knn": (),
    "pairwise_loss": (),
    "ames_attention": (),
    "avsl_distance": (),
}


def triton_interpreting() -> bool:
    """Whether Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import triton  # type: ignore[import-untyped]

    return bool(triton.knobs.runtime.interpret)


def measured_faster(kernel: str, device: torch.device) -> bool:
    """Whether :data:`MEASURED` holds a run on this CUDA device's model in which ``kernel`` beat torch."""
    if device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    return any(m.device_name == name and m.speedup > 1.0 for m in MEASURED.get(kernel, ()))


def resolve_backend(kernel: str, backend: str, device: torch.device | str) -> Literal["torch", "triton"]:
    """The implementation that runs ``kernel`` for tensors on ``device``.

    Raises:
        ValueError: if ``backend`` is not one of ``"torch"``, ``"triton"``, ``"auto"``.
        ImportError: for ``"triton"`` without the triton package.
        RuntimeError: for ``"triton"`` with CPU tensors outside the interpreter.
    """
    if kernel not in MEASURED:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(MEASURED)}")
    backend = check_choice(backend, "backend", KernelBackend)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if measured_faster(kernel, device) else "torch"
    if backend == "triton":
        try:
            interpreting = triton_interpreting()
        except ImportError as err:
            raise ImportError("backend='triton' needs the triton package (pip install triton)") from err
        if device.type != "cuda" and not interpreting:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors, got {device.type} tensors; to run the kernel on CPU "
                "tensors under the Triton interpreter, set TRITON_INTERPRET=1 before its first use"
            )
        return "triton"
    return "torch"


def jit(fn: Callable[..., Any]) -> Callable[[], Any]:
    """A cached factory of ``triton.jit(fn)``, made on first use: Triton reads ``TRITON_INTERPRET`` when a
    kernel is made, and importing this package must not need triton."""

    @functools.cache
    def make() -> Any:
        import triton

        return triton.jit(fn)

    return make
