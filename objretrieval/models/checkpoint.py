"""Checkpoint files: reading (safetensors or torch pickles, safely), downloading, writing, strict loading.

Pickles are read with ``torch.load(weights_only=True)``: only tensors, containers and the classes a checkpoint
format declares safe are rebuilt, never arbitrary objects, unless the caller opts in with
``weights_only=False``. Writing always produces safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from objretrieval.models.registry import NATIVE_FORMAT, PretrainedCfg

PathLike = str | os.PathLike[str]

# Containers under which training scripts commonly nest the weights, tried in this order.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state", "module")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""

    def __init__(
        self,
        missing: Sequence[str],
        unexpected: Sequence[str],
        shape_mismatch: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
        context: str = "",
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatch = list(shape_mismatch)

        def listing(keys: Sequence[Any]) -> str:
            shown = ", ".join(map(str, keys[:20]))
            return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")

        parts = [f"checkpoint does not match the model{context}:"]
        if self.missing:
            parts.append(f"  missing keys ({len(self.missing)}): {listing(self.missing)}")
        if self.unexpected:
            parts.append(f"  unexpected keys ({len(self.unexpected)}): {listing(self.unexpected)}")
        if self.shape_mismatch:
            shapes = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch]
            parts.append(f"  shape mismatches ({len(shapes)}): {listing(shapes)}")
        super().__init__("\n".join(parts))


@contextlib.contextmanager
def _allowing(safe_globals: Sequence[Any]) -> Iterator[None]:
    if safe_globals:
        with torch.serialization.safe_globals(list(safe_globals)):
            yield
    else:
        yield


def read_checkpoint(path: PathLike, *, weights_only: bool = True, safe_globals: Sequence[Any] = ()) -> Any:
    """Read a checkpoint file onto the CPU.

    ``.safetensors`` files give a dict of tensors. Anything else goes through ``torch.load`` with
    ``weights_only`` (default True: no arbitrary code runs), allowing ``safe_globals`` in addition.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    with _allowing(safe_globals):
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:  # torch raises UnpicklingError wrapped in various ways
            if weights_only and "weights_only" in str(err):
                raise RuntimeError(
                    f"{path} contains objects that weights_only loading refuses. If you trust the file, pass "
                    f"weights_only=False to load it with full unpickling.\nOriginal error: {err}"
                ) from err
            raise


def checkpoint_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty for other files)."""
    if Path(path).suffix != ".safetensors":
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
            + (f" with keys {sorted(obj)[:10]}" if isinstance(obj, Mapping) else "")
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
        if given[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        return CheckpointMismatchError(missing, unexpected, shapes)
    return None


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True) -> None:
    """Load ``state_dict`` into ``model``; in strict mode any missing/unexpected key or shape raises first."""
    mismatch = compare_state_dicts(model.state_dict(), state_dict)
    if mismatch is not None and (strict or mismatch.shape_mismatch):
        raise mismatch
    model.load_state_dict(state_dict, strict=strict)


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _cache_file_name(cfg: PretrainedCfg) -> str:
    """Cache name with the digest before the extension, as ``torch.hub`` expects for hash checking."""
    if cfg.file_name:
        return cfg.file_name
    assert cfg.url is not None
    base = os.path.basename(urlparse(cfg.url).path) or "checkpoint.pt"
    stem, dot, ext = base.partition(".")
    stem = stem.replace("-", "_")  # torch.hub takes the hash from the first "-<hex>." in the name
    return f"{stem}-{cfg.sha256}.{ext}" if cfg.sha256 and dot else base


def download_pretrained(
    cfg: PretrainedCfg, *, progress: bool = True, weights_only: bool = True, safe_globals: Sequence[Any] = ()
) -> Any:
    """Fetch ``cfg.url`` into the ``torch.hub`` cache (verifying the sha256) and read it.

    Torch pickles go through ``torch.hub.load_state_dict_from_url``, which checks the digest embedded in the
    cache file name. safetensors files, which that function cannot read, are fetched with
    ``torch.hub.download_url_to_file`` into the same cache and checked against the full digest.
    """
    if not cfg.url:
        raise ValueError("this pretrained configuration has no URL")
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cache_dir.mkdir(parents=True, exist_ok=True)
    file_name = _cache_file_name(cfg)
    if not file_name.endswith(".safetensors"):
        with _allowing(safe_globals):
            return torch.hub.load_state_dict_from_url(
                cfg.url,
                model_dir=str(cache_dir),
                map_location="cpu",
                progress=progress,
                check_hash=cfg.sha256 is not None,
                file_name=file_name,
                weights_only=weights_only,
            )
    cached = cache_dir / file_name
    if not cached.exists():
        torch.hub.download_url_to_file(cfg.url, str(cached), hash_prefix=cfg.sha256, progress=progress)
    elif cfg.sha256 and sha256_of(cached) != cfg.sha256:
        raise RuntimeError(
            f"cached file {cached} does not match sha256 {cfg.sha256}; delete it to re-download"
        )
    return read_checkpoint(cached)
