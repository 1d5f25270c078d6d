"""The one dtype rule of every loss, miner and pairwise score: compute in float32, or float64 if given float64.

Half-precision inputs (float16/bfloat16, e.g. from an autocast forward pass) are upcast and autocast is
switched off inside, so sums over many pairs do not lose precision or overflow; float64 inputs stay float64
so gradient checks and references keep their precision. Results come back in the compute dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any floating input is float64, else float32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def upcast(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` in ``dtype`` (default :func:`compute_dtype` of ``x``); a no-op when it already is."""
    return x.to(compute_dtype(x) if dtype is None else dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off for ``device``'s type, so the computation runs in the dtype its inputs were upcast to."""
    device_type = torch.device(device).type
    with torch.autocast(device_type, enabled=False):
        yield
