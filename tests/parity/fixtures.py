"""Parity-fixture plumbing: the fixture root, manifests, tolerances."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def fixture_root() -> Path:
    """``$OBJRETRIEVAL_FIXTURES``, else ``../shared/fixtures`` beside the repository."""
    env = os.environ.get("OBJRETRIEVAL_FIXTURES")
    return Path(env).resolve() if env else (REPO_ROOT / ".." / "shared" / "fixtures").resolve()


class MethodFixtures:
    """One method's fixture directory: its manifest and its tensor files."""

    def __init__(self, method: str) -> None:
        self.dir = fixture_root() / method
        self.manifest: dict[str, Any] = json.loads((self.dir / "manifest.json").read_text())

    def tensors(self, relative: str) -> dict[str, torch.Tensor]:
        path = self.dir / relative
        assert path.is_file(), f"manifest names {relative}, which is missing from {self.dir}"
        return load_file(str(path))

    def json(self, relative: str) -> Any:
        return json.loads((self.dir / relative).read_text())


def method_fixtures(method: str) -> MethodFixtures:
    """Load a method's fixtures; skip only when the fixture root itself is absent (never when it is there)."""
    root = fixture_root()
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root} (set OBJRETRIEVAL_FIXTURES)")
    assert (root / method / "manifest.json").is_file(), f"{root / method} has no manifest.json"
    return MethodFixtures(method)


def nonempty(names: list[str], what: str) -> list[str]:
    """``names``, for a parametrised parity test; an error when fixtures are present but none match ``what``.

    An empty parameter list would make pytest skip the test silently; parity tests skip only when the fixture
    root is absent.
    """
    if not names and fixture_root().is_dir():
        raise LookupError(f"no parity fixture matches {what} under {fixture_root()}; the test would not run")
    return names


def fixtures_of_kind(method: str, kind: str, *, prefix: bool = False) -> list[str]:
    """Names of a method's manifest fixtures whose ``kind`` is ``kind`` (or starts with it, with ``prefix``);
    none when the fixture root is absent, an error when it is present and none matches."""
    if not fixture_root().is_dir():
        return []
    fixtures = MethodFixtures(method).manifest["fixtures"]
    names = [
        name
        for name, spec in fixtures.items()
        if spec.get("kind") == kind or (prefix and str(spec.get("kind", "")).startswith(kind))
    ]
    return nonempty(names, f"{method} kind {kind!r}")


def key_listing_files(method: str) -> list[str]:
    """The ``{section: {key: [shape, dtype]}}`` key-listing JSON files a method's manifest names (the entry's
    name is the file); none when the fixture root is absent, an error when it is present and names none."""
    if not fixture_root().is_dir():
        return []
    fixtures = MethodFixtures(method).manifest["fixtures"]
    names = [name for name, spec in fixtures.items() if "[shape, dtype]" in str(spec.get("format", ""))]
    return nonempty(names, f"{method} key listings")


_NUMBER = r"[0-9.]+(?:e-?[0-9]+)?"


def random_state(listing: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
    """Random tensors for a ``{key: [shape, dtype]}`` key listing (floats normal, integers zero)."""
    out = {}
    for key, (shape, dtype) in listing.items():
        dt = getattr(torch, dtype)
        out[key] = torch.randn(shape).to(dt) if dt.is_floating_point else torch.zeros(shape, dtype=dt)
    return out


def parse_tolerance(spec: Any) -> tuple[float, float]:
    """(rtol, atol) from a manifest tolerance: a dict, or prose such as 'exact (abs 1e-12)' / 'atol 1e-6'."""
    if isinstance(spec, dict):
        return float(spec.get("rtol", 0.0)), float(spec.get("atol", 0.0))
    text = str(spec)
    rtol = re.search(rf"rtol\s*({_NUMBER})", text)
    atol = re.search(rf"(?:atol|abs|up to)\s*({_NUMBER})", text)
    if rtol is None and atol is None:
        assert text.startswith("exact"), f"cannot read tolerance {text!r}"
    return (float(rtol.group(1)) if rtol else 0.0), (float(atol.group(1)) if atol else 0.0)


def assert_close(actual: Any, expected: Any, tolerance: tuple[float, float], what: str) -> None:
    actual_t = torch.as_tensor(actual, dtype=torch.float64)
    expected_t = torch.as_tensor(expected, dtype=torch.float64).reshape(actual_t.shape)
    rtol, atol = tolerance
    torch.testing.assert_close(
        actual_t, expected_t, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def ks_in_name(name: str, prefix: str) -> list[int]:
    """The K values a fixture encodes in a tensor name, e.g. expected_recall_at_1_2_4 -> [1, 2, 4]."""
    rest = name[len(prefix) :]
    return [int(t) for t in re.match(r"((?:\d+_?)+)", rest).group(1).strip("_").split("_")]
