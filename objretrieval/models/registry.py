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
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload
from urllib.parse import urlparse

from torch import Tensor, nn

#: Name of objretrieval's own checkpoint format: a flat state dict with the module's own keys.
NATIVE_FORMAT = "objretrieval"

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: torch.hub's convention for a digest in a file name (``resnet50-0676ba61.pth``); ``torch.hub.HASH_REGEX``.
_NAME_HASH = re.compile(r"-([a-f0-9]*)\.")


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a pretrained checkpoint lives and how the model expects its input. Pure data.

    Attributes:
        url: download location (``https://``, ``file://``...); fetched through ``torch.hub``. Plain ``http://``
            is refused at download time unless a digest is known (see :attr:`expected_hash`).
        sha256: full lowercase hex digest of the file, verified after download.
        file_name: name in the ``torch.hub`` cache; defaults to the URL's basename (with ``-<sha256>``
            inserted when ``sha256`` is set and the name carries no digest). As in ``torch.hub``, a
            ``-<hex>.`` in this name (``resnet50-0676ba61.pth``) is a prefix of the file's sha256.
        checkpoint_format: name of the :class:`CheckpointFormat` the file is stored in.
        input_size: (C, H, W) the model was trained at, if it takes images.
        mean, std: input normalisation.
        interpolation: resize interpolation used in training.
        descriptor: what the model consumes or produces (e.g. "DINOv2 ViT-B/14 local, 768-d").
        license: license of the weights.
        paper: citation or URL of the paper.
        notes: anything else a user should know.
        trained_on: the data the weights were trained on.
        expected: ``(what, value)`` results the paper or the authors report for these weights (e.g.
            ``("ROxford mAP, medium", 92.7)``), what an evaluation with them should reproduce.
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
    trained_on: str | None = None
    expected: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.url is None:
            return
        prefix = self.name_hash
        if self.sha256 and prefix and not self.sha256.startswith(prefix):
            raise ValueError(
                f"sha256 {self.sha256} disagrees with the digest prefix {prefix!r} in the file name "
                f"{self.download_name!r} (torch.hub's name-<hex>.ext convention)"
            )

    @property
    def download_name(self) -> str:
        """The file's name as ``torch.hub`` sees it: :attr:`file_name`, else the URL's basename."""
        if self.file_name:
            return self.file_name
        return os.path.basename(urlparse(self.url or "").path) or "checkpoint.pt"

    @property
    def name_hash(self) -> str | None:
        """The sha256 prefix in :attr:`download_name` (``name-<hex>.ext``, read as ``torch.hub`` does), if any."""
        found = _NAME_HASH.search(self.download_name)
        return found.group(1) if found and found.group(1) else None

    @property
    def expected_hash(self) -> str | None:
        """What a download is checked against: the full :attr:`sha256`, else :attr:`name_hash`, else None."""
        return self.sha256 or self.name_hash


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
            raise ValueError(
                f"model {self.name!r} has no pretrained configuration registered; load weights with "
                "checkpoint=... instead"
            )
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
        if "." in key:
            raise ValueError(f"model names cannot contain '.', which separates a pretrained tag: {key!r}")
        if key in _REGISTRY:
            raise ValueError(
                f"a model named {key!r} is already registered (by {_REGISTRY[key].builder.__module__})"
            )
        cfgs = {"default": pretrained} if isinstance(pretrained, PretrainedCfg) else dict(pretrained or {})
        known = {f.name: f for f in formats}
        if len(known) < len(formats) or NATIVE_FORMAT in known:
            raise ValueError(
                f"{key}: checkpoint format names must be distinct and not {NATIVE_FORMAT!r}, got "
                f"{[f.name for f in formats]}"
            )
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
    del _REGISTRY[get_model_entry(name).name]


def split_model_name(name: str) -> tuple[str, str | None]:
    """``"name.tag"``, as :func:`list_pretrained` prints it, -> ``("name", "tag")``; ``"name"`` ->
    ``("name", None)``."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    base, dot, tag = name.partition(".")
    if dot and not (base and tag):
        raise ValueError(f"model name must be 'name' or 'name.tag', got {name!r}")
    return base, tag or None


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (a ``name.tag`` must name a registered tag); the error suggests close
    names when it is unknown."""
    base, tag = split_model_name(name)
    try:
        entry = _REGISTRY[base]
    except KeyError:
        close = difflib.get_close_matches(base, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown model {base!r}{hint} (objretrieval.list_models() lists them)") from None
    if tag is not None:
        entry.pretrained_cfg(tag)  # raises, listing the tags, when it is not one of them
    return entry


def list_models(pattern: str | None = None, *, pretrained: bool = False) -> list[str]:
    """Sorted registered names, optionally filtered by an ``fnmatch`` pattern and to those with weights."""
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if pretrained:
        names = [n for n in names if _REGISTRY[n].has_pretrained]
    return names


def model_card(name: str) -> str:
    """A markdown model card of the pretrained configuration ``name`` (``"model.tag"`` or ``"model"`` for its
    first tag): source, license, input, training data, the numbers reported for it, and notes."""
    model, given = split_model_name(name)
    entry = get_model_entry(name)
    cfg = entry.pretrained_cfg(given)
    tag = given or next(t for t, c in entry.pretrained_cfgs.items() if c is cfg)
    rows = [
        ("weights", cfg.url),
        ("sha256", cfg.sha256 or "not published"),
        ("checkpoint format", cfg.checkpoint_format),
        ("license", cfg.license),
        ("paper", cfg.paper),
        ("input", cfg.descriptor),
        ("image size", None if cfg.input_size is None else " x ".join(map(str, cfg.input_size))),
        ("normalisation", None if cfg.mean is None else f"mean {cfg.mean}, std {cfg.std}"),
        ("trained on", cfg.trained_on),
    ]
    lines = [f"## `{model}.{tag}`", "", f'`create_model("{model}.{tag}", pretrained=True)`', ""]
    lines += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows if value is not None]
    if cfg.expected:
        lines += ["", "Reported results:", "", "| | |", "|---|---|"]
        lines += [f"| {what} | {value:g} |" for what, value in cfg.expected]
    if cfg.notes:
        lines += ["", cfg.notes]
    return "\n".join(lines) + "\n"


def model_cards() -> str:
    """The model cards page of the docs (``docs/model_cards.md``): one :func:`model_card` per pretrained
    configuration. Regenerate the page with
    ``uv run python -c "from objretrieval.models.registry import model_cards; print(model_cards(), end='')"
    > docs/model_cards.md``."""
    intro = (
        "# Model cards\n\n"
        "One card per pretrained configuration (`objretrieval.list_pretrained()`), generated from the registry's\n"
        "metadata (`objretrieval.models.registry.model_cards`; a test keeps this page equal to it). The reported\n"
        "results are the paper's or the authors' numbers for these weights, not measured here: the weights are\n"
        "downloaded on first use, which this project's test machines cannot do.\n"
    )
    return intro + "".join("\n" + model_card(name) for name in list_pretrained())


def list_pretrained(pattern: str | None = None) -> list[str]:
    """``name.tag`` for every registered pretrained configuration with weights to download."""
    return [
        f"{n}.{tag}"
        for n in list_models(pattern, pretrained=True)
        for tag, cfg in _REGISTRY[n].pretrained_cfgs.items()
        if cfg.url
    ]
