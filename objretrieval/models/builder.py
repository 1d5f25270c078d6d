"""``create_model``: build a registered model and load its weights from anywhere they may come from."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from objretrieval.models.checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    PathLike,
    compare_state_dicts,
    download_pretrained,
    load_quietly,
    read_checkpoint,
    unwrap_state_dict,
    warn_if_partial,
)
from objretrieval.models.registry import (
    NATIVE_FORMAT,
    CheckpointFormat,
    ModelEntry,
    PretrainedCfg,
    get_model_entry,
    split_model_name,
)

_NATIVE = CheckpointFormat(NATIVE_FORMAT, unwrap_state_dict, description="objretrieval's own keys")
_OWN_ARGUMENTS = "pretrained, checkpoint, checkpoint_format, strict, weights_only, progress"


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
        name: a name from :func:`objretrieval.list_models`, or a ``name.tag`` from
            :func:`objretrieval.list_pretrained`, which selects that pretrained configuration (as in timm,
            its weights load only with ``pretrained=True``).
        pretrained: True for the pretrained weights (the tag in ``name``, else the default), or a tag.
            Downloaded through ``torch.hub`` (cached under ``$TORCH_HOME``) and checked against their sha256
            when one is known (see :func:`~objretrieval.models.checkpoint.fetch_pretrained`).
        checkpoint: a ``.safetensors`` / ``.pt`` / ``.pth`` path, or an already loaded state dict or
            checkpoint object, in objretrieval's format or any official format registered for this model.
        checkpoint_format: with ``checkpoint``, force a format name instead of detecting it from the keys.
        strict: require the checkpoint's keys to match the model's exactly. With False the common keys load,
            a ``RuntimeWarning`` names the missing and unexpected ones, and a checkpoint sharing no key
            with the model is refused. Shapes must always match.
        weights_only: read pickles without rebuilding arbitrary objects (set False only for trusted files).
        progress: show a download progress bar.
        **overrides: configuration passed to the builder (e.g. ``num_encoder_layers=2``).

    Returns:
        The model, in training mode as ``nn.Module`` builds it. With a pretrained configuration (``pretrained``
        or a ``name.tag``) it carries the :class:`~objretrieval.models.PretrainedCfg` as
        ``model.pretrained_cfg``; after loading weights, the
        :class:`~objretrieval.models.checkpoint.LoadReport` as ``model.load_report``.

    Raises:
        CheckpointMismatchError: keys differ in strict mode, shapes differ, or nothing matches; lists them.
        TypeError: an override the builder does not take, or an argument of the wrong type.
        ValueError: an unknown tag or format, ``pretrained`` for a model without released weights, or an
            unreadable checkpoint file.
    """
    base, tag = split_model_name(name)
    entry = get_model_entry(base)
    for flag, value in (("strict", strict), ("weights_only", weights_only), ("progress", progress)):
        if not isinstance(value, bool):  # a truthy string such as "no" would otherwise mean True
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained or checkpoint, not both")
    if checkpoint_format is not None and checkpoint is None:
        raise ValueError("checkpoint_format applies to checkpoint=...; no checkpoint was given")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        hint = "; pass its state_dict()" if isinstance(checkpoint, nn.Module) else ""
        raise TypeError(
            f"checkpoint must be a file path or a loaded checkpoint, got {type(checkpoint).__name__}{hint}"
        )
    selected = _selected_cfg(entry, tag, pretrained)  # checked before building: a bad request fails fast
    model = _build(entry, overrides)
    report: LoadReport | None = None
    if selected is not None:
        model.pretrained_cfg = selected[1]  # type: ignore[assignment]
    if pretrained:
        assert selected is not None
        report = _load_pretrained(
            model, entry, *selected, strict=strict, weights_only=weights_only, progress=progress
        )
    elif checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            loaded = checkpoint
        else:
            safe = [g for f in entry.formats.values() for g in f.safe_globals]
            loaded = read_checkpoint(Path(checkpoint), weights_only=weights_only, safe_globals=safe)
        where, state_dict = _resolve_format(entry, model, loaded, checkpoint_format, strict)
        report = load_quietly(model, state_dict, strict=strict, context=f" {base!r} ({where})")
    if report is not None:
        warn_if_partial(report, f" {base!r}", stacklevel=2)  # points at the caller of create_model
        model.load_report = report  # type: ignore[assignment]
    return model


def _selected_cfg(entry: ModelEntry, tag: str | None, pretrained: Any) -> tuple[str, PretrainedCfg] | None:
    """``(tag, cfg)`` asked for by ``name.tag`` and/or ``pretrained`` (True or a tag; they must agree), or None.

    With ``pretrained``, the configuration must have weights to download.
    """
    if not isinstance(pretrained, (bool, str)):
        raise TypeError(f"pretrained must be a bool or a tag string, got {type(pretrained).__name__}")
    if isinstance(pretrained, str):
        if not pretrained:
            raise ValueError("pretrained is an empty tag; pass True, False or a tag from list_pretrained()")
        if tag is not None and tag != pretrained:
            raise ValueError(f"the name asks for tag {tag!r} but pretrained={pretrained!r}; give one of them")
        tag = pretrained
    if tag is None and not pretrained:
        return None
    cfg = entry.pretrained_cfg(tag)  # raises, listing the tags, when it is unknown
    tag = tag or next(iter(entry.pretrained_cfgs))
    if pretrained and not cfg.url:
        raise ValueError(
            f"{entry.name}.{tag} has no released weights to download"
            + (f" ({cfg.notes})" if cfg.notes else "")
            + "; load a checkpoint with checkpoint=... instead"
        )
    return tag, cfg


def _build(entry: ModelEntry, overrides: Mapping[str, Any]) -> nn.Module:
    try:
        model = entry.builder(**overrides)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise TypeError(
            f"model {entry.name!r} does not take an argument given to create_model: {err} (create_model's own "
            f"arguments are {_OWN_ARGUMENTS}; the others go to the builder)"
        ) from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder of {entry.name!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_pretrained(
    model: nn.Module,
    entry: ModelEntry,
    tag: str,
    cfg: PretrainedCfg,
    *,
    strict: bool,
    weights_only: bool,
    progress: bool,
) -> LoadReport:
    fmt = entry.formats.get(cfg.checkpoint_format, _NATIVE)
    loaded = download_pretrained(
        cfg, progress=progress, weights_only=weights_only, safe_globals=fmt.safe_globals
    )
    try:
        state_dict = fmt.convert(loaded)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{cfg.url} is not in format {fmt.name!r} of {entry.name}.{tag}: {err}") from err
    return load_quietly(model, state_dict, strict=strict, context=f" {entry.name}.{tag}")


def _resolve_format(
    entry: ModelEntry, model: nn.Module, loaded: Any, forced: str | None, strict: bool
) -> tuple[str, Mapping[str, Tensor]]:
    """``(which format, state dict)``: ``loaded`` converted with the forced format, else with the first
    registered format whose keys fit the model exactly, else (non-strict) with the closest one."""
    formats = [_NATIVE, *entry.formats.values()]
    if forced is not None:
        chosen = next((f for f in formats if f.name == forced), None)
        if chosen is None:
            raise ValueError(
                f"model {entry.name!r} has no checkpoint format {forced!r}; known: {[f.name for f in formats]}"
            )
        formats = [chosen]
    expected = model.state_dict()
    failures: list[str] = []
    best: tuple[int, CheckpointMismatchError, str, Mapping[str, Tensor]] | None = None
    for fmt in formats:
        try:
            candidate = fmt.convert(loaded)
        except (KeyError, TypeError, ValueError) as err:
            failures.append(f"{fmt.name}: {type(err).__name__}: {err}")
            continue
        mismatch = compare_state_dicts(expected, candidate)
        if mismatch is None:
            return f"format {fmt.name!r}", candidate
        size = len(mismatch.missing) + len(mismatch.unexpected) + len(mismatch.shape_mismatch)
        if best is None or size < best[0]:
            best = (size, mismatch, fmt.name, candidate)
    if best is None:
        raise ValueError(
            f"could not read the checkpoint as any format of {entry.name!r}:\n  " + "\n  ".join(failures)
        )
    _, mismatch, fmt_name, candidate = best
    where = (
        f"format {fmt_name!r}" if forced else f"closest of formats {[f.name for f in formats]}: {fmt_name!r}"
    )
    if strict or mismatch.shape_mismatch or mismatch.disjoint:
        raise mismatch.in_context(f" {entry.name!r} ({where})")
    return where, candidate


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
