"""torch.distributed, seen the same way everywhere: one place that asks whether processes cooperate.

Every module that reduces or exchanges state across processes (DINO's centre, AVSL's link statistics, the
samplers' shard of each batch, the distributed losses, metrics and search) goes through these functions, so
"not initialised" and "a world of one" mean the same thing in all of them. Each takes an optional process
``group`` (default: the default group). Collectives are those of ``torch.distributed`` (gloo on CPU, nccl on
GPUs); tensors with uneven first dimensions are padded to the largest, exchanged, and unpadded.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from objretrieval._validation import check_positive_int

#: A ``torch.distributed`` process group; None means the default group.
Group = Any

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a default process group is initialised (a world of one counts: collectives are then no-ops)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Group = None) -> int:
    """Number of processes in ``group``, 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Group = None) -> int:
    """This process's rank in ``group``, 0 when not distributed."""
    return dist.get_rank(group) if is_distributed() else 0


def global_rank(group: Group, r: int) -> int:
    """The default group's rank of ``group``'s rank ``r`` (what ``src``/``dst`` of a collective expect)."""
    return r if group is None else dist.get_global_rank(group, r)


@torch.no_grad()
def all_reduce_mean_(t: Tensor, group: Group = None) -> Tensor:
    """Replace ``t`` in place by its mean over all processes (unchanged in a single process)."""
    if world_size(group) > 1:
        dist.all_reduce(t, group=group)
        t /= world_size(group)
    return t


@torch.no_grad()
def all_reduce_sum_(t: Tensor, group: Group = None) -> Tensor:
    """Replace ``t`` in place by its sum over all processes (unchanged in a single process)."""
    if world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def comm_device(t: Tensor, group: Group = None) -> torch.device:
    """Where a tensor must live for the group's backend: nccl exchanges CUDA tensors (on this process's
    current device when ``t`` is on the CPU), gloo CPU tensors; other backends take ``t`` where it is."""
    backend = dist.get_backend(group)
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.uint8,  # packed binary codes
)


@torch.no_grad()
def all_gather_sizes(n: int, group: Group = None, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. its number of rows), in rank order."""
    if world_size(group) == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(s) for s in out]


_MAX_DIMS = 8  # tensors exchanged along their first dimension have at most this many dimensions


@torch.no_grad()
def gather_row_counts(x: Tensor, name: str, group: Group = None) -> list[int]:
    """Every rank's number of rows of ``x``, after checking that all ranks agree on the rest of its layout.

    Every rank receives every rank's layout (and whether its dtype and number of dimensions can be
    exchanged at all), so a mismatch raises the same error on all of them instead of hanging, or corrupting,
    the exchange that would follow.
    """
    dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -1
    shape = list(x.shape) if 1 <= x.ndim <= _MAX_DIMS else [-1]
    layout = [shape[0], x.ndim, dtype, *shape[1:], *[-1] * (_MAX_DIMS - len(shape))]
    t = torch.tensor(layout, dtype=torch.int64, device=comm_device(x, group))
    out = [torch.empty_like(t) for _ in range(world_size(group))]
    dist.all_gather(out, t, group=group)
    rows = torch.stack(out).cpu()
    unusable = (rows[:, 0] < 0) | (rows[:, 2] < 0)
    if bool(unusable.any()) or bool((rows[:, 1:] != rows[0, 1:]).any()):
        described = "; ".join(f"rank {r}: {_describe(row)}" for r, row in enumerate(rows.tolist()))
        raise ValueError(
            f"{name}: every rank must pass a tensor of 1 to {_MAX_DIMS} dimensions, of one of the dtypes "
            f"{[str(d) for d in _DTYPES]}, with the same trailing shape and dtype (rows may differ); got "
            f"{described}"
        )
    return [int(n) for n in rows[:, 0]]


def _describe(row: list[int]) -> str:
    n, ndim, dtype, *trailing = row
    kind = str(_DTYPES[dtype]) if dtype >= 0 else "an unsupported dtype"
    if n < 0:
        return f"a {ndim}-d tensor of {kind}"
    return f"({', '.join(map(str, [n, *trailing[: ndim - 1]]))}) {kind}"


def gather_padded(x: Tensor, sizes: list[int], group: Group = None) -> list[Tensor]:
    """Each rank's ``x`` (first dimensions ``sizes``, rank order), exchanged padded to the largest size."""
    device = comm_device(x, group)
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x.detach().to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[:s].to(x.device) for p, s in zip(parts, sizes, strict=True)]


@torch.no_grad()
def all_gather_uneven(x: Tensor, group: Group = None, name: str = "x") -> tuple[Tensor, list[int]]:
    """Concatenate every rank's ``x`` along dim 0 in rank order (sizes may differ); no gradient.

    Returns:
        The concatenation, on ``x``'s device, and the per-rank sizes.
    """
    if world_size(group) == 1:
        return x, [x.shape[0]]
    sizes = gather_row_counts(x, name, group)
    return torch.cat(gather_padded(x, sizes, group)), sizes


def shard_offsets(sizes: list[int]) -> list[int]:
    """The first global row of each rank's shard, for shards concatenated in rank order."""
    offsets, total = [], 0
    for s in sizes:
        offsets.append(total)
        total += s
    return offsets


def shard_range(num_items: int, group: Group = None) -> range:
    """This rank's share of ``num_items`` items: contiguous, in rank order, sizes differing by at most one.

    The first ``num_items % world_size`` ranks hold one item more; concatenating every rank's share in rank
    order gives ``range(num_items)``. All of it without a process group.
    """
    num_items = check_positive_int(num_items, "num_items", minimum=0)
    world, r = world_size(group), rank(group)
    base, extra = divmod(num_items, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def check_on_every_rank(check: Callable[[], tuple[T, Hashable]], what: str, group: Group = None) -> T:
    """Run this rank's argument checks; if any rank's fail, or the ranks' settings differ, raise on all.

    A collective whose ranks were given bad or different arguments would otherwise fail on one rank and hang
    the others in their next exchange, or mix their results without a word. ``check()`` returns the checked
    values and the settings every rank must share (a tuple of ``(name, value)`` pairs, so that the error
    names what differs); one small exchange of every rank's outcome then raises the same error, naming the
    ranks, everywhere. In a world of one the check runs as it is.

    Returns:
        What ``check()`` returned first.

    Raises:
        TypeError: if every failing rank raised a TypeError; ValueError otherwise (failures or disagreeing
            settings).
    """
    if world_size(group) == 1:
        return check()[0]
    try:
        result, settings = check()
        outcome: tuple[Any, Any] = (None, settings)
    except (TypeError, ValueError) as err:
        outcome = ((type(err).__name__, str(err)), None)
    everyone: list[Any] = [None] * world_size(group)
    dist.all_gather_object(everyone, outcome, group=group)
    failures = [(r, err) for r, (err, _) in enumerate(everyone) if err is not None]
    if failures:
        kind = TypeError if all(name == "TypeError" for _, (name, _) in failures) else ValueError
        raise kind(f"{what}: " + "; ".join(f"rank {r}: {message}" for r, (_, message) in failures))
    agreed = [s for _, s in everyone]
    if len(set(agreed)) > 1:
        raise ValueError(
            f"{what}: every rank must pass the same arguments, but ranks differ in {_differences(agreed)}"
        )
    return result


def _differences(settings: list[Any]) -> str:
    """The settings that differ between ranks: ``name: [per-rank values]`` for ``((name, value), ...)``."""
    named = all(
        isinstance(s, tuple) and all(isinstance(i, tuple) and len(i) == 2 for i in s) for s in settings
    )
    if not named or len({tuple(name for name, _ in s) for s in settings}) > 1:
        return "; ".join(f"rank {r}: {s}" for r, s in enumerate(settings))
    columns = zip(*[[value for _, value in s] for s in settings], strict=True)
    names = [name for name, _ in settings[0]]
    return "; ".join(f"{n}: {list(c)}" for n, c in zip(names, columns, strict=True) if len(set(c)) > 1)
