"""Model registry: builders are small decorated functions; pretrained weights and checkpoint formats are data.

```python
@register_model(
    pretrained={"default": PretrainedCfg(url="https://.../dinov2_ames.pt", sha256="...",
                                         checkpoint_format="ames_official", license="MIT")},
    formats=[AMES_OFFICIAL],
)
def dinov2_ames(**overrides) -> AMES:
    return AMES(**{**DINOV2_CONFIG, **overrides})
```

:func:`objretrieval.create_model` builds the module, then downloads or reads a checkpoint and converts it with
the named :class:`CheckpointFormat`; ``hubconf.py`` re-exports every registered name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from torch import Tensor, nn

#: Name of objretrieval's own checkpoint format: a flat state dict with the module's own keys.
NATIVE_FORMAT = "objretrieval"


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a pretrained checkpoint lives and how the model expects its input. Pure data.

    Attributes:
        url: download location (``https://``, ``file://``...); fetched through ``torch.hub``.
        sha256: full hex digest of the file, verified after download.
        file_name: name in the ``torch.hub`` cache; defaults to the URL's basename with the digest inserted.
        checkpoint_format: name of the :class:`CheckpointFormat` the file is stored in.
        input_size: (C, H, W) the model was trained at, if it takes images.
        mean, std: input normalisation.
        interpolation: resize interpolation used in training.
        descriptor: what the model consumes or produces (e.g. "DINOv2 ViT-B/14 local, 768-d").
        license: license of the weights.
        paper: citation or URL of the paper.
        notes: anything else a user should know.
    """

    url: str | None = None
    sha256: str | None = None
    file_name: str | None = None
    checkpoint_format: str = NATIVE_FORMAT
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    descriptor: str | None = None
    license: str | None = None
    paper: str | None = None
    notes: str | None = None


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout and how to turn it into the model's own state dict.

    Attributes:
        name: identifier, referenced by :attr:`PretrainedCfg.checkpoint_format`.
        convert: maps the loaded object (a dict of tensors, or whatever ``torch.load`` returned) to a state
            dict with the model's keys. It may raise ``KeyError``/``TypeError`` when the object is not in
            this format; format detection then moves on.
        safe_globals: classes this format's pickles contain besides tensors (e.g. ``argparse.Namespace``)
            that ``torch.load(weights_only=True)`` may rebuild.
        description: one line for error messages and docs.
    """

    name: str
    convert: Callable[[Any], Mapping[str, Tensor]]
    safe_globals: tuple[Any, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, pretrained configurations and the checkpoint formats it reads."""

    name: str
    builder: Callable[..., nn.Module]
    pretrained_cfgs: Mapping[str, PretrainedCfg] = field(default_factory=dict)
    formats: Mapping[str, CheckpointFormat] = field(default_factory=dict)

    @property
    def has_pretrained(self) -> bool:
        return any(cfg.url for cfg in self.pretrained_cfgs.values())

    def pretrained_cfg(self, tag: str | None = None) -> PretrainedCfg:
        """The pretrained configuration ``tag`` (default: the first registered)."""
        if not self.pretrained_cfgs:
            raise ValueError(f"model {self.name!r} has no pretrained weights registered")
        if tag is None:
            return next(iter(self.pretrained_cfgs.values()))
        if tag not in self.pretrained_cfgs:
            raise ValueError(
                f"model {self.name!r} has no pretrained tag {tag!r}; "
                f"available: {sorted(self.pretrained_cfgs)}"
            )
        return self.pretrained_cfgs[tag]


_REGISTRY: dict[str, ModelEntry] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


@overload
def register_model(fn: F) -> F: ...


@overload
def register_model(
    *,
    pretrained: Mapping[str, PretrainedCfg] | PretrainedCfg | None = ...,
    formats: Sequence[CheckpointFormat] = ...,
    name: str | None = ...,
) -> Callable[[F], F]: ...


def register_model(
    fn: F | None = None,
    *,
    pretrained: Mapping[str, PretrainedCfg] | PretrainedCfg | None = None,
    formats: Sequence[CheckpointFormat] = (),
    name: str | None = None,
) -> F | Callable[[F], F]:
    """Register a model builder under its function name (or ``name``).

    Use bare (``@register_model``) or with pretrained configurations and checkpoint formats. The builder takes
    keyword overrides of the model's configuration and returns an ``nn.Module``; weights are loaded by
    :func:`objretrieval.create_model`, not by the builder.
    """

    def decorate(builder: F) -> F:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(
                f"a model named {key!r} is already registered (by {_REGISTRY[key].builder.__module__})"
            )
        cfgs = {"default": pretrained} if isinstance(pretrained, PretrainedCfg) else dict(pretrained or {})
        known = {f.name: f for f in formats}
        for tag, cfg in cfgs.items():
            if cfg.checkpoint_format != NATIVE_FORMAT and cfg.checkpoint_format not in known:
                raise ValueError(
                    f"{key}.{tag} uses checkpoint format {cfg.checkpoint_format!r}, which is not "
                    f"among the formats registered with it: {sorted(known)}"
                )
        _REGISTRY[key] = ModelEntry(key, builder, cfgs, known)
        return builder

    return decorate(fn) if fn is not None else decorate


def unregister_model(name: str) -> None:
    """Remove a registered model (for plugins and tests that register temporary builders)."""
    get_model_entry(name)
    del _REGISTRY[name]


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; the error suggests close names when it is unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} (objretrieval.list_models() lists them)") from None


def list_models(pattern: str | None = None, *, pretrained: bool = False) -> list[str]:
    """Sorted registered names, optionally filtered by an ``fnmatch`` pattern and to those with weights."""
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if pretrained:
        names = [n for n in names if _REGISTRY[n].has_pretrained]
    return names


def list_pretrained(pattern: str | None = None) -> list[str]:
    """``name.tag`` for every registered pretrained configuration."""
    return [
        f"{n}.{tag}" for n in list_models(pattern, pretrained=True) for tag in _REGISTRY[n].pretrained_cfgs
    ]
