"""``create_model``: build a registered model and load its weights from anywhere they may come from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from objretrieval.models.checkpoint import (
    CheckpointMismatchError,
    PathLike,
    compare_state_dicts,
    download_pretrained,
    load_state_dict_into,
    read_checkpoint,
    unwrap_state_dict,
)
from objretrieval.models.registry import NATIVE_FORMAT, CheckpointFormat, ModelEntry, get_model_entry

_NATIVE = CheckpointFormat(NATIVE_FORMAT, unwrap_state_dict, description="objretrieval's own keys")


def create_model(
    name: str,
    pretrained: bool | str = False,
    checkpoint: PathLike | Mapping[str, Any] | None = None,
    *,
    checkpoint_format: str | None = None,
    strict: bool = True,
    weights_only: bool = True,
    progress: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build the registered model ``name`` and optionally load weights.

    Args:
        name: a name from :func:`objretrieval.list_models`.
        pretrained: True for the default pretrained weights, or a tag (see
            :func:`objretrieval.list_pretrained`). Downloaded through ``torch.hub`` (cached under
            ``$TORCH_HOME``) and checked against their sha256.
        checkpoint: a ``.safetensors`` / ``.pt`` / ``.pth`` path, or an already loaded state dict or
            checkpoint object, in objretrieval's format or any official format registered for this model.
        checkpoint_format: force a format name instead of detecting it from the keys.
        strict: require the checkpoint's keys and shapes to match the model exactly.
        weights_only: read pickles without rebuilding arbitrary objects (set False only for trusted files).
        progress: show a download progress bar.
        **overrides: configuration passed to the builder (e.g. ``num_layers=2``).

    Returns:
        The model, in training mode as ``nn.Module`` builds it. With ``pretrained`` it carries the
        :class:`~objretrieval.models.PretrainedCfg` as ``model.pretrained_cfg``.

    Raises:
        CheckpointMismatchError: in strict mode, when keys or shapes differ; lists them.
    """
    entry = get_model_entry(name)
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained or checkpoint, not both")
    model = entry.builder(**overrides)
    if pretrained:
        cfg = entry.pretrained_cfg(pretrained if isinstance(pretrained, str) else None)
        fmt = entry.formats.get(cfg.checkpoint_format, _NATIVE)
        loaded = download_pretrained(
            cfg, progress=progress, weights_only=weights_only, safe_globals=fmt.safe_globals
        )
        load_state_dict_into(model, _convert(fmt, loaded, name), strict=strict)
        model.pretrained_cfg = cfg  # type: ignore[assignment]
    elif checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            loaded = checkpoint
        else:
            safe = [g for f in entry.formats.values() for g in f.safe_globals]
            loaded = read_checkpoint(Path(checkpoint), weights_only=weights_only, safe_globals=safe)
        state_dict = _resolve_format(entry, model, loaded, checkpoint_format, strict)
        load_state_dict_into(model, state_dict, strict=strict)
    return model


def _convert(fmt: CheckpointFormat, loaded: Any, name: str) -> Mapping[str, Tensor]:
    try:
        return fmt.convert(loaded)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint is not in format {fmt.name!r} of model {name!r}: {err}") from err


def _resolve_format(
    entry: ModelEntry, model: nn.Module, loaded: Any, forced: str | None, strict: bool
) -> Mapping[str, Tensor]:
    """Convert ``loaded`` with the forced format, or the first registered format whose keys fit the model."""
    formats = [_NATIVE, *entry.formats.values()]
    if forced is not None:
        chosen = next((f for f in formats if f.name == forced), None)
        if chosen is None:
            raise ValueError(
                f"model {entry.name!r} has no checkpoint format {forced!r}; "
                f"known: {[f.name for f in formats]}"
            )
        return _convert(chosen, loaded, entry.name)
    expected = model.state_dict()
    best: tuple[int, CheckpointMismatchError, str] | None = None
    fallback: Mapping[str, Tensor] | None = None
    for fmt in formats:
        try:
            candidate = fmt.convert(loaded)
        except (KeyError, TypeError, ValueError):
            continue
        mismatch = compare_state_dicts(expected, candidate)
        if mismatch is None:
            return candidate
        size = len(mismatch.missing) + len(mismatch.unexpected) + len(mismatch.shape_mismatch)
        if best is None or size < best[0]:
            best, fallback = (size, mismatch, fmt.name), candidate
    if best is None:
        raise ValueError(
            f"could not read the checkpoint as any format of {entry.name!r}: {[f.name for f in formats]}"
        )
    if strict or best[1].shape_mismatch:
        raise CheckpointMismatchError(
            best[1].missing,
            best[1].unexpected,
            best[1].shape_mismatch,
            f" {entry.name!r} (closest format: {best[2]!r})",
        )
    assert fallback is not None
    return fallback


def hub_entrypoint(name: str) -> Callable[..., nn.Module]:
    """A ``torch.hub`` entry point for ``name``: pretrained weights by default when the model has them."""
    entry = get_model_entry(name)

    def load(pretrained: bool | str | None = None, **kwargs: Any) -> nn.Module:
        if pretrained is None:  # a local checkpoint replaces the default download
            pretrained = entry.has_pretrained and kwargs.get("checkpoint") is None
        return create_model(name, pretrained=pretrained, **kwargs)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (entry.builder.__doc__ or f"Build {name}.") + (
        "\n\nLoaded through torch.hub: ``pretrained`` defaults to True when weights are registered and no "
        "``checkpoint`` is given; other keyword arguments go to objretrieval.create_model."
    )
    return load
