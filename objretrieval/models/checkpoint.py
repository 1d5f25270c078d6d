"""Checkpoint files: reading (safetensors or torch pickles, safely), downloading, writing, strict loading.

Pickles are read with ``torch.load(weights_only=True)``: only tensors, containers and the classes a checkpoint
format declares safe are rebuilt, never arbitrary objects, unless the caller opts in with
``weights_only=False``. Writing always produces safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from objretrieval._validation import check_not_meta
from objretrieval.models.registry import NATIVE_FORMAT, PretrainedCfg

PathLike = str | os.PathLike[str]

# Containers under which training scripts commonly nest the weights, tried in this order.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state", "module")
_LISTED = 5  # keys named in a warning


def _listing(keys: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(map(str, keys[:limit]))
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into.

    Attributes:
        missing: model keys the checkpoint lacks.
        unexpected: checkpoint keys the model lacks.
        shape_mismatch: ``(key, checkpoint shape, model shape)`` of the common keys whose shapes differ.
        disjoint: the checkpoint shares no key with the model (wrong model or wrong format).
    """

    def __init__(
        self,
        missing: Sequence[str],
        unexpected: Sequence[str],
        shape_mismatch: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
        context: str = "",
        *,
        disjoint: bool = False,
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatch = list(shape_mismatch)
        self.disjoint = disjoint
        if disjoint:
            context += (
                " (it shares no key with the model, so nothing would be loaded: wrong model or format?)"
            )
        parts = [f"checkpoint does not match the model{context}:"]
        if self.missing:
            parts.append(f"  missing keys ({len(self.missing)}): {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"  unexpected keys ({len(self.unexpected)}): {_listing(self.unexpected)}")
        if self.shape_mismatch:
            shapes = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch]
            parts.append(f"  shape mismatches ({len(shapes)}): {_listing(shapes)}")
        super().__init__("\n".join(parts))

    def in_context(self, context: str) -> CheckpointMismatchError:
        """The same mismatch, its message naming ``context`` (e.g. the model and the checkpoint format)."""
        return CheckpointMismatchError(
            self.missing, self.unexpected, self.shape_mismatch, context, disjoint=self.disjoint
        )


class LoadReport(NamedTuple):
    """What a checkpoint load did, like the ``_IncompatibleKeys`` of ``nn.Module.load_state_dict``.

    Attributes:
        missing_keys: model keys the checkpoint lacks; they keep their initial values.
        unexpected_keys: checkpoint keys the model lacks; they were ignored.
        loaded_keys: model keys loaded from the checkpoint.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    loaded_keys: list[str]

    @property
    def complete(self) -> bool:
        """Whether the checkpoint and the model had exactly the same keys."""
        return not self.missing_keys and not self.unexpected_keys


@contextlib.contextmanager
def _allowing(safe_globals: Sequence[Any]) -> Iterator[None]:
    if safe_globals:
        with torch.serialization.safe_globals(list(safe_globals)):
            yield
    else:
        yield


def _file_kind(path: Path) -> Literal["empty", "safetensors", "torch"]:
    """What a file holds, from its first bytes (the suffix is not trusted): ``"safetensors"`` is an 8-byte
    header length followed by a JSON header that fits in the file; anything else is left to ``torch.load``."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    return "torch"


def read_checkpoint(path: PathLike, *, weights_only: bool = True, safe_globals: Sequence[Any] = ()) -> Any:
    """Read a checkpoint file onto the CPU.

    A safetensors file (recognised by its header, whatever its suffix) gives a dict of tensors. Anything else
    goes through ``torch.load`` with ``weights_only`` (default True: no arbitrary code runs), allowing
    ``safe_globals`` in addition.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is empty, or neither a safetensors file nor a readable torch checkpoint.
        RuntimeError: ``weights_only`` loading refuses an object the file pickles.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    kind = _file_kind(path)
    if kind == "empty":
        raise ValueError(f"checkpoint '{path}' is empty (0 bytes); expected a safetensors or torch.save file")
    if kind == "safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
            raise ValueError(f"checkpoint '{path}' is not a valid safetensors file: {err}") from err
    with _allowing(safe_globals):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError...
            if weights_only and "Weights only load failed" in str(err):
                raise RuntimeError(
                    f"{path} contains objects that weights_only loading refuses. If you trust the file, pass "
                    f"weights_only=False to load it with full unpickling.\nOriginal error: {err}"
                ) from err
            raise ValueError(
                f"checkpoint '{path}' is not a torch checkpoint (nor a safetensors file): torch.load failed "
                f"with {type(err).__name__}: {err}"
            ) from err


def checkpoint_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty for other files)."""
    if _file_kind(Path(path)) != "safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Find the flat ``{name: tensor}`` mapping in a loaded checkpoint.

    Accepts a state dict itself or one nested under a common container key (``state_dict``, ``model``,
    ``state``...), and strips the ``module.`` prefix that ``DataParallel``/DDP adds.
    """
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            nested = next((obj[k] for k in _NESTED_KEYS if k in obj), None)
            if nested is not None:
                obj = nested
                continue
        raise TypeError(
            f"no state dict found in checkpoint object of type {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else "")
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def compare_state_dicts(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor]
) -> CheckpointMismatchError | None:
    """The mismatch between a model's state dict and a checkpoint's, or None when they agree."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        (k, tuple(given[k].shape), tuple(expected[k].shape))
        for k in sorted(set(expected) & set(given))
        if isinstance(given[k], Tensor)
        and isinstance(expected[k], Tensor)
        and given[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        disjoint = bool(expected) and len(missing) == len(expected)  # nothing would load (an empty file too)
        return CheckpointMismatchError(missing, unexpected, shapes, disjoint=disjoint)
    return None


def _check_tensors(state_dict: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """Refuse non-tensor values and meta tensors: loading them would leave the model without weights."""
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, expected a tensor")
        if value.is_meta:
            raise ValueError(
                f"checkpoint tensor {key!r} is on the meta device (shape {tuple(value.shape)}, no data): the "
                "checkpoint holds no weights (was it saved from a model built on the meta device?)"
            )
    on_meta = [k for k, v in model_state.items() if isinstance(v, Tensor) and v.is_meta]
    if on_meta:
        raise ValueError(
            f"the model has {len(on_meta)} tensors on the meta device (e.g. {on_meta[0]!r}), which "
            "load_state_dict cannot fill; materialise the model first, e.g. model.to_empty(device='cpu')"
        )


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True, context: str = ""
) -> LoadReport:
    """Load ``state_dict`` into ``model`` and report which keys were loaded, missing and unexpected.

    Args:
        model: the module to fill.
        state_dict: ``{key: tensor}`` with the model's keys.
        strict: require exactly the model's keys. With ``strict=False`` the common keys load, and a
            ``RuntimeWarning`` names the missing and unexpected ones.
        context: appended to error and warning messages (e.g. the model's name).

    Returns:
        The :class:`LoadReport`.

    Raises:
        CheckpointMismatchError: keys differ in strict mode; any shape differs; or the checkpoint shares no
            key with the model (it would load nothing, even with ``strict=False``).
        TypeError, ValueError: a value is not a tensor; the checkpoint or the model has meta tensors.
    """
    report = load_quietly(model, state_dict, strict=strict, context=context)
    warn_if_partial(report, context, stacklevel=2)
    return report


def load_quietly(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool, context: str
) -> LoadReport:
    """:func:`load_state_dict_into` without the warning, for callers that warn from their own frame."""
    expected = model.state_dict()
    _check_tensors(state_dict, expected)
    mismatch = compare_state_dicts(expected, state_dict)
    if mismatch is not None and (strict or mismatch.shape_mismatch or mismatch.disjoint):
        raise mismatch.in_context(context)
    model.load_state_dict(state_dict, strict=strict)
    missing, unexpected = (mismatch.missing, mismatch.unexpected) if mismatch is not None else ([], [])
    return LoadReport(list(missing), list(unexpected), sorted(set(expected) & set(state_dict)))


def warn_if_partial(report: LoadReport, context: str, stacklevel: int) -> None:
    """A ``RuntimeWarning`` naming the first missing and unexpected keys of a non-strict load, if any.

    ``stacklevel`` counts as ``warnings.warn``'s from the caller's frame: 2 attributes the warning to the
    caller's caller.
    """
    if report.complete:
        return
    total = len(report.loaded_keys) + len(report.missing_keys)
    warnings.warn(
        f"checkpoint loaded partially{context}: {len(report.loaded_keys)} of {total} model tensors; "
        f"{len(report.missing_keys)} missing, left at their initial values "
        f"({_listing(report.missing_keys, _LISTED) or 'none'}); {len(report.unexpected_keys)} unexpected, "
        f"ignored ({_listing(report.unexpected_keys, _LISTED) or 'none'}). The full lists are in the "
        "LoadReport (model.load_report after create_model).",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def save_checkpoint(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: PathLike,
    *,
    model_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write weights as safetensors, with objretrieval's format tag and optional model name in the header.

    Tensors that share storage (tied weights) are written once each, as safetensors requires.
    """
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else dict(model_or_state_dict)
    )
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        check_not_meta(value, f"state dict entry {key!r}")
        t = value.detach().cpu().contiguous()
        ident = (int(t.untyped_storage().data_ptr()), int(t.storage_offset()))
        tensors[key] = t.clone() if ident in seen else t
        seen.add(ident)
    header = {"format": NATIVE_FORMAT, **({"model": model_name} if model_name else {}), **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _cache_file_name(cfg: PretrainedCfg) -> str:
    """The file's name with ``-<sha256>`` before the extension when the digest is set and the name lacks one,
    so that files of different digests never share a cache entry."""
    name = cfg.download_name
    if cfg.file_name or not cfg.sha256 or cfg.name_hash:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{cfg.sha256}.{ext}" if dot else f"{name}-{cfg.sha256}"


def fetch_pretrained(cfg: PretrainedCfg, *, progress: bool = True) -> Path:
    """Download ``cfg.url`` into the ``torch.hub`` cache, verifying its sha256 when one is known; the path.

    The download is checked against :attr:`PretrainedCfg.expected_hash` (the full ``sha256``, else the
    ``-<hex>`` prefix in the file name, as ``torch.hub`` checks it) by ``torch.hub.download_url_to_file``,
    which keeps the file only if it matches. A file already in the cache is used as it is: it was checked when
    it was downloaded (when a digest was known), and its name carries the digest, so a new digest means a new
    download.

    Raises:
        ValueError: no URL, or a plain ``http://`` URL with no known digest (nothing would vouch for the file).
        RuntimeError: the downloaded file's sha256 does not match.
    """
    if not cfg.url:
        raise ValueError("this pretrained configuration has no URL: no weights were released for it")
    expected = cfg.expected_hash
    if urlparse(cfg.url).scheme == "http" and expected is None:
        raise ValueError(
            f"refusing to download {cfg.url}: plain http with no known sha256, so nothing would verify the "
            "file; use an https URL or set PretrainedCfg.sha256"
        )
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / _cache_file_name(cfg)
    if not cached.exists():
        try:
            torch.hub.download_url_to_file(cfg.url, str(cached), hash_prefix=expected, progress=progress)
        except RuntimeError as err:
            if "invalid hash value" not in str(err):
                raise
            source = (
                "PretrainedCfg.sha256" if cfg.sha256 else f"the -<hex> in the file name {cfg.download_name!r}"
            )
            raise RuntimeError(f"download of {cfg.url} failed verification against {source}: {err}") from err
    return cached


def download_pretrained(
    cfg: PretrainedCfg, *, progress: bool = True, weights_only: bool = True, safe_globals: Sequence[Any] = ()
) -> Any:
    """Fetch ``cfg.url`` (see :func:`fetch_pretrained`) and read it with :func:`read_checkpoint`."""
    return read_checkpoint(
        fetch_pretrained(cfg, progress=progress), weights_only=weights_only, safe_globals=safe_globals
    )
