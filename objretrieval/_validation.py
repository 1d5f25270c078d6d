"""Argument checks shared by the public API.

Every check raises with a message that names the argument and states what was expected, so that bad input
fails loudly at the boundary instead of producing a silently wrong number deep inside a metric.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import numpy as np
import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _describe(x: Any) -> str:
    if isinstance(x, (Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def to_tensor(x: Any, name: str) -> Tensor:
    """Return ``x`` as a tensor without copying where possible (tensors, numpy arrays, memmaps, h5py datasets,
    nested lists)."""
    if isinstance(x, Tensor):
        check_not_meta(x, name)
        return x
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError as err:  # ragged nesting
            raise TypeError(f"{name} must be a rectangular array, got a ragged {type(x).__name__}") from err
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got an object array")
        return torch.from_numpy(np.ascontiguousarray(x))
    if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__"):  # h5py.Dataset and friends
        return torch.from_numpy(np.ascontiguousarray(x[()]))
    raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {_describe(x)}")


def check_not_meta(t: Tensor, name: str) -> None:
    """Refuse a meta tensor: it has a shape but no values, so anything computed from it is meaningless."""
    if t.is_meta:
        raise ValueError(
            f"{name} is a meta tensor (shape {tuple(t.shape)}, no data); materialise it first, e.g. "
            "module.to_empty(device=...) followed by loading real weights"
        )


def check_embeddings(x: Any, name: str) -> Tensor:
    """Return ``x`` as a floating (N, D) tensor with N >= 1, D >= 1 and only finite values."""
    t = to_tensor(x, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_items, dim), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one row, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has zero-dimensional rows: shape {tuple(t.shape)}")
    check_finite_values(t, name)
    return t


def check_finite_values(t: Tensor, name: str, row_offset: int = 0) -> None:
    """Raise if ``t`` holds NaN or inf, naming the first offending row (entry, for a 1-D ``t``)."""
    # One reduction pass: a sum is finite unless some value is NaN/inf (or the sum overflows, which the
    # exact check below then clears). torch.isfinite alone would take four passes over every gallery block.
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = ~finite if finite.ndim < 2 else (~finite).flatten(1).any(dim=1)
        bad_row = int(bad.reshape(-1).nonzero()[0, 0]) + row_offset
        raise ValueError(f"{name} contains NaN or inf values (first at row {bad_row})")


def check_labels(labels: Any, name: str, length: int | None = None, length_of: str | None = None) -> Tensor:
    """Return ``labels`` as a 1-D int64 tensor.

    Labels stay integers end to end: float labels are rejected rather than cast, because float32 cannot
    represent every integer above 2**24 and distinct classes would silently merge.
    """
    if isinstance(labels, (list, tuple)) and len(labels) == 0:
        t = torch.empty(0, dtype=torch.int64)  # numpy would call an empty list float64
    else:
        t = to_tensor(labels, name)
    if t.dtype == torch.bool or t.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{name} must have an integer dtype (int64 preferred), got {t.dtype}; "
            "float labels are refused because float32 merges distinct ids above 2**24"
        )
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (num_items,), got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        what = f" (one per row of {length_of})" if length_of else ""
        raise ValueError(f"{name} has {t.shape[0]} entries, expected {length}{what}")
    return t.to(torch.int64)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int, refusing bools, floats and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(value: Any, name: str, choices: Any) -> Any:
    """Return ``value`` if it is one of ``choices``: a ``Literal[...]`` alias or a sequence of values.

    Passing the ``Literal`` alias that types the argument keeps the allowed values written once, and the
    result types as that alias at the call site (``self.mode: Mode = check_choice(mode, "mode", Mode)``).
    """
    allowed = get_args(choices) if get_origin(choices) is Literal else tuple(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def check_ranking(x: Any, name: str) -> Tensor:
    """Return a 2-D integer array of ids (one row per query, best first) as an int64 CPU tensor."""
    t = to_tensor(x, name)
    if t.dtype == torch.bool or t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integer ids, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_queries, depth), got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.int64)


def check_padding_mask(mask: Any, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A bool padding mask (True at padded slots) of exactly ``shape``, moved to ``device``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True at padding), got {_describe(mask)}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.to(device)


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the interval given by ``low``/``high``.

    ``low_open``/``high_open`` exclude the bound itself (``low=0, low_open=True`` means "> 0").
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        interval = f"{opening}{left}, {right}{closing}"
        raise ValueError(f"{name} must lie in {interval}, got {v:g}")
    return v


def check_not_all_padded(padding: Tensor, name: str, what: str = "row") -> None:
    """Raise if some set in a (B, N) padding mask (True at padded slots) has no real element, naming it.

    A fully padded set has no content to embed or score: attention over it yields NaN or a plausible-looking
    constant, both silently wrong.
    """
    empty = padding.all(dim=-1)
    if bool(empty.any()):
        first = int(empty.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{name}: {what} {first} is entirely padding (no real element to use)")


def check_label_range(labels: Tensor, name: str, num_classes: int) -> Tensor:
    """Return ``labels`` if every one lies in [0, num_classes), as labels indexing per-class parameters must."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), got min {int(labels.min())}, "
            f"max {int(labels.max())}"
        )
    return labels


def check_label_rows(
    labels: Any, name: str, length: int | None = None, length_of: str | None = None
) -> Tensor:
    """Return integer labels with one entry or one row per item, (N,) or (N, L) (e.g. hierarchical levels).

    The same rules as :func:`check_labels`, for labels that a custom comparison reads level by level.
    """
    if isinstance(labels, (list, tuple)) and len(labels) == 0:
        return check_labels(labels, name, length, length_of)
    t = to_tensor(labels, name)
    if t.ndim > 2:
        raise ValueError(f"{name} must be (num_items,) or (num_items, levels), got shape {tuple(t.shape)}")
    if t.ndim < 2:
        return check_labels(t, name, length, length_of)
    if t.shape[1] == 0:
        raise ValueError(f"{name} has no label levels: shape {tuple(t.shape)}")
    check_labels(t[:, 0], name, length, length_of)  # dtype and length
    return t.to(torch.int64)


def check_padded_sets(values: Tensor, name: str, mask: Any, what: str = "set") -> Tensor | None:
    """Validate sets ``values`` (S, N, ...) with an optional (S, N) padding mask (True at padded slots).

    Returns the mask as a bool tensor on ``values``' device. Every set needs a real element and real elements
    must be finite, each failure naming the set; padded slots may hold anything, as they are never read.
    """
    if mask is not None:
        mask = check_padding_mask(mask, "mask", tuple(values.shape[:2]), values.device)
        check_not_all_padded(mask, "mask", what)
        values = values.masked_fill(mask.view(*mask.shape, *(1,) * (values.ndim - 2)), 0)
    check_finite_values(values, name)  # the row it names is the set
    return mask


def check_index_range(indices: Tensor, name: str, *, low: int = 0, high: int) -> Tensor:
    """Return integer ``indices`` if every one lies in [low, high)."""
    if indices.numel() and (int(indices.min()) < low or int(indices.max()) >= high):
        raise ValueError(
            f"{name} must lie in [{low}, {high}), got min {int(indices.min())}, max {int(indices.max())}"
        )
    return indices
