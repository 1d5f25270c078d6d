"""Binary codes packed eight bits to a byte (numpy's ``packbits`` order): 128 bits take 16 bytes.

The binarized AMES model packs its database codes with these; :mod:`objretrieval.descriptors` re-exports them.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # most significant bit first


def pack_bits(bits: Tensor) -> Tensor:
    """(..., n) bool -> (..., n / 8) uint8, most significant bit first (as ``numpy.packbits``)."""
    if bits.shape[-1] % 8:
        raise ValueError(f"the number of bits ({bits.shape[-1]}) must be a multiple of 8")
    grouped = bits.reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8).to(torch.uint8)  # explicit: 0 rows too
    return (grouped * _BITS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor) -> Tensor:
    """(..., m) uint8 -> (..., 8 m) bool, inverse of :func:`pack_bits`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    bits = (packed[..., None] & _BITS.to(packed.device)) > 0
    return bits.flatten(-2)


def signs_from_bits(packed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(..., m) packed codes -> (..., 8 m) values +1 / -1, the binarized descriptors a model consumes."""
    return unpack_bits(packed).to(dtype) * 2 - 1
