"""Model registry, checkpoint formats, pretrained downloads and the torch.hub entry point."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import objretrieval
from objretrieval.models import (
    CheckpointFormat,
    CheckpointMismatchError,
    PretrainedCfg,
    checkpoint_metadata,
    get_model_entry,
    register_model,
    save_checkpoint,
    unregister_model,
)
from objretrieval.models.checkpoint import sha256_of

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny_test_embedder"


class TinyEmbedder(nn.Module):
    def __init__(self, in_dim: int = 8, out_dim: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def _from_official(obj: dict) -> dict[str, torch.Tensor]:
    """The 'official' layout of this test model: weights under 'state', prefixed 'encoder.'."""
    return {k.removeprefix("encoder."): v for k, v in obj["state"].items()}


OFFICIAL = CheckpointFormat(
    "tiny_official",
    _from_official,
    safe_globals=(argparse.Namespace,),
    description="weights under 'state', keys prefixed 'encoder.'",
)


def _official_checkpoint(model: nn.Module) -> dict:
    return {
        "state": {f"encoder.{k}": v.clone() for k, v in model.state_dict().items()},
        "args": argparse.Namespace(lr=0.1),
    }


@pytest.fixture
def reference_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyEmbedder()


@pytest.fixture
def registered(tmp_path: Path, reference_model: nn.Module, monkeypatch) -> Iterator[dict]:
    """Register the tiny builder with two pretrained configs served from file:// URLs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))
    official = tmp_path / "serve" / "tiny-official.pth"
    official.parent.mkdir()
    torch.save(_official_checkpoint(reference_model), official)
    native = save_checkpoint(reference_model, tmp_path / "serve" / "tiny.safetensors", model_name=NAME)

    def tiny_test_embedder(**overrides) -> TinyEmbedder:
        """A two-layer test embedder."""
        return TinyEmbedder(**overrides)

    register_model(
        pretrained={
            "official": PretrainedCfg(
                url=official.as_uri(),
                sha256=sha256_of(official),
                checkpoint_format="tiny_official",
                license="Apache-2.0",
            ),
            "native": PretrainedCfg(url=native.as_uri(), sha256=sha256_of(native)),
        },
        formats=[OFFICIAL],
    )(tiny_test_embedder)
    yield {"official": official, "native": native}
    unregister_model(NAME)
    torch.hub.set_dir(str(Path(torch.hub._get_torch_home()) / "hub"))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_listing(registered) -> None:
    assert NAME in objretrieval.list_models()
    assert objretrieval.list_models("tiny_*") == [NAME]
    assert objretrieval.list_models("nothing_*") == []
    assert NAME in objretrieval.list_models(pretrained=True)
    assert (
        f"{NAME}.official" in objretrieval.list_pretrained()
        and f"{NAME}.native" in objretrieval.list_pretrained()
    )


def test_builder_overrides(registered) -> None:
    model = objretrieval.create_model(NAME, out_dim=6)
    assert model.proj.out_features == 6


def test_native_safetensors_round_trip(registered, reference_model, tmp_path) -> None:
    model = objretrieval.create_model(NAME, checkpoint=registered["native"])
    assert _same_weights(model, reference_model)
    assert checkpoint_metadata(registered["native"]) == {"format": "objretrieval", "model": NAME}


def test_official_checkpoint_is_detected_and_converted(registered, reference_model) -> None:
    from_path = objretrieval.create_model(
        NAME, checkpoint=registered["official"]
    )  # Namespace allowed by format
    assert _same_weights(from_path, reference_model)
    from_object = objretrieval.create_model(NAME, checkpoint=_official_checkpoint(reference_model))
    assert _same_weights(from_object, reference_model)
    forced = objretrieval.create_model(
        NAME, checkpoint=_official_checkpoint(reference_model), checkpoint_format="tiny_official"
    )
    assert _same_weights(forced, reference_model)


def test_data_parallel_prefix_is_stripped(registered, reference_model) -> None:
    wrapped = {f"module.{k}": v for k, v in reference_model.state_dict().items()}
    assert _same_weights(objretrieval.create_model(NAME, checkpoint={"state_dict": wrapped}), reference_model)


def test_strict_loading_lists_missing_and_unexpected_keys(registered, reference_model) -> None:
    state = reference_model.state_dict()
    state.pop("norm.bias")
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): norm.bias") as info:
        objretrieval.create_model(NAME, checkpoint=state)
    assert info.value.unexpected == ["head.weight"]
    relaxed = objretrieval.create_model(NAME, checkpoint=state, strict=False)
    assert torch.equal(relaxed.proj.weight, reference_model.proj.weight)
    with pytest.raises(CheckpointMismatchError, match=r"proj.weight checkpoint \(4, 8\) vs model \(6, 8\)"):
        objretrieval.create_model(NAME, checkpoint=reference_model.state_dict(), out_dim=6, strict=False)


def test_pickles_are_loaded_weights_only_by_default(registered, reference_model, tmp_path) -> None:
    path = tmp_path / "unsafe.pt"
    torch.save({"state_dict": reference_model.state_dict(), "extra": TinyEmbedder}, path)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        objretrieval.create_model(NAME, checkpoint=path)
    trusted = objretrieval.create_model(NAME, checkpoint=path, weights_only=False)
    assert _same_weights(trusted, reference_model)


@pytest.mark.parametrize("tag", ["official", "native"])
def test_pretrained_download_verifies_sha256(registered, reference_model, tag) -> None:
    model = objretrieval.create_model(NAME, pretrained=tag)
    assert _same_weights(model, reference_model)
    assert model.pretrained_cfg.license == ("Apache-2.0" if tag == "official" else None)
    cached = list(Path(torch.hub.get_dir(), "checkpoints").iterdir())
    assert any(get_model_entry(NAME).pretrained_cfgs[tag].sha256 in p.name for p in cached)


def test_pretrained_download_rejects_a_wrong_hash(registered, tmp_path) -> None:
    entry = get_model_entry(NAME)
    good = entry.pretrained_cfgs["native"]
    unregister_model(NAME)
    register_model(pretrained=PretrainedCfg(url=good.url, sha256="0" * 64), name=NAME)(entry.builder)
    with pytest.raises(RuntimeError, match="invalid hash value"):
        objretrieval.create_model(NAME, pretrained=True)


def _import_hubconf():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_hub_load_local(registered, reference_model) -> None:
    hubconf = _import_hubconf()  # what torch.hub.list / help inspect: dir() and the entry's docstring
    assert NAME in dir(hubconf) and callable(getattr(hubconf, NAME))
    assert "test embedder" in getattr(hubconf, NAME).__doc__
    assert set(hubconf.dependencies) >= {"torch", "faiss", "safetensors"}
    with pytest.raises(AttributeError, match="no entry point 'resnet9000'"):
        hubconf.resnet9000  # noqa: B018
    model = torch.hub.load(str(REPO_ROOT), NAME, source="local")  # pretrained by default through the hub
    assert isinstance(model, TinyEmbedder) and _same_weights(model, reference_model)
    bare = torch.hub.load(str(REPO_ROOT), NAME, source="local", pretrained=False, out_dim=3)
    assert bare.proj.out_features == 3


def test_registry_errors(registered) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(name=NAME)(lambda: TinyEmbedder())
    with pytest.raises(KeyError, match="did you mean 'tiny_test_embedder'"):
        objretrieval.create_model("tiny_test_embeder")
    with pytest.raises(ValueError, match="no pretrained tag 'v2'"):
        objretrieval.create_model(NAME, pretrained="v2")
    with pytest.raises(ValueError, match="either pretrained or checkpoint"):
        objretrieval.create_model(NAME, pretrained=True, checkpoint={})
    with pytest.raises(ValueError, match="checkpoint format 'other'"):
        register_model(pretrained=PretrainedCfg(url="file:///x", checkpoint_format="other"), name="x")(
            TinyEmbedder
        )
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        objretrieval.create_model(NAME, checkpoint="missing.safetensors")
    with pytest.raises(ValueError, match="has no checkpoint format 'nope'"):
        objretrieval.create_model(NAME, checkpoint={}, checkpoint_format="nope")


def test_tied_weights_are_saved(tmp_path) -> None:
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, shared)
    path = save_checkpoint(tied, tmp_path / "tied.safetensors")
    loaded = objretrieval.models.read_checkpoint(path)
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])
