"""Model registry, checkpoint formats, pretrained downloads and the torch.hub entry point."""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import objretrieval
from objretrieval.models import (
    CheckpointFormat,
    CheckpointMismatchError,
    LoadReport,
    PretrainedCfg,
    checkpoint_metadata,
    get_model_entry,
    load_state_dict_into,
    read_checkpoint,
    register_model,
    save_checkpoint,
    split_model_name,
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
    with pytest.warns(RuntimeWarning, match="loaded partially"):
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
    tagged = torch.hub.load(str(REPO_ROOT), f"{NAME}.native", source="local")  # name.tag, pretrained
    assert (
        _same_weights(tagged, reference_model) and tagged.pretrained_cfg.checkpoint_format == "objretrieval"
    )


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
    with pytest.raises(ValueError, match="format names must be distinct"):
        register_model(formats=[OFFICIAL, OFFICIAL], name="twice")(TinyEmbedder)
    assert "twice" not in objretrieval.list_models()
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


# -- non-strict loading reports what it skipped and refuses what matches nothing ------------------------------


def test_non_strict_loading_warns_and_reports_missing_and_unexpected_keys(
    registered, reference_model
) -> None:
    state = reference_model.state_dict()
    state.pop("norm.bias")
    state["head.weight"] = torch.zeros(1)
    with pytest.warns(
        RuntimeWarning, match=r"3 of 4 model tensors; 1 missing.*norm\.bias.*1 unexpected.*head"
    ):
        model = objretrieval.create_model(NAME, checkpoint=state, strict=False)
    report = model.load_report
    assert report.missing_keys == ["norm.bias"] and report.unexpected_keys == ["head.weight"]
    assert report.loaded_keys == ["norm.weight", "proj.bias", "proj.weight"] and not report.complete
    assert torch.equal(model.proj.weight, reference_model.proj.weight)


def test_complete_loading_reports_and_does_not_warn(registered, reference_model) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = objretrieval.create_model(NAME, checkpoint=reference_model.state_dict(), strict=False)
    assert model.load_report.complete and len(model.load_report.loaded_keys) == 4


def test_non_strict_official_checkpoint_with_a_missing_key(registered, reference_model, tmp_path) -> None:
    official = _official_checkpoint(reference_model)
    del official["state"]["encoder.norm.weight"]
    path = tmp_path / "partial-official.pth"
    torch.save(official, path)
    with pytest.warns(RuntimeWarning, match="1 missing"):
        model = objretrieval.create_model(NAME, checkpoint=path, strict=False)
    assert model.load_report.missing_keys == ["norm.weight"] and model.load_report.unexpected_keys == []
    assert torch.equal(model.proj.weight, reference_model.proj.weight)


@pytest.mark.parametrize("kind", ["safetensors", "official"])
def test_a_checkpoint_sharing_no_key_is_refused_even_non_strict(registered, tmp_path, kind) -> None:
    foreign = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    if kind == "safetensors":
        path = save_checkpoint(foreign, tmp_path / "foreign.safetensors")
    else:
        path = tmp_path / "foreign-official.pth"
        torch.save(_official_checkpoint(foreign), path)
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match="shares no key with the model") as info:
            objretrieval.create_model(NAME, checkpoint=path, strict=strict)
        assert info.value.disjoint and "proj.weight" in info.value.missing
        assert any(k.endswith("0.weight") for k in info.value.unexpected)


def test_load_state_dict_into_returns_the_report(reference_model) -> None:
    target = TinyEmbedder()
    state = {k: v for k, v in reference_model.state_dict().items() if k.startswith("proj.")}
    with pytest.warns(RuntimeWarning, match=r"2 of 4 model tensors; 2 missing"):
        report = load_state_dict_into(target, state, strict=False)
    assert report == LoadReport(["norm.bias", "norm.weight"], [], ["proj.bias", "proj.weight"])
    assert torch.equal(target.proj.weight, reference_model.proj.weight)
    with pytest.raises(CheckpointMismatchError, match="shares no key"):
        load_state_dict_into(target, {"other.weight": torch.zeros(4, 8)}, strict=False)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(2\)"):
        load_state_dict_into(target, state)  # strict by default


# -- unreadable files and meta tensors: clear errors naming the file -------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_empty_checkpoint_file(registered, tmp_path, suffix) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"checkpoint '.*empty{suffix}' is empty \(0 bytes\)"):
        objretrieval.create_model(NAME, checkpoint=path)
    with pytest.raises(ValueError, match="is empty"):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_text_file_is_not_a_checkpoint(registered, tmp_path, suffix) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match=rf"'.*notes{suffix}' is not a torch checkpoint \(nor a safetensors"):
        objretrieval.create_model(NAME, checkpoint=path)


def test_truncated_torch_file(registered, reference_model, tmp_path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(reference_model.state_dict(), whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"'.*cut\.pt' is not a torch checkpoint.*torch\.load failed"):
        objretrieval.create_model(NAME, checkpoint=cut)


def test_file_content_decides_the_reader(registered, reference_model, tmp_path) -> None:
    # a safetensors file with a .pt name (torch.load would fail on it, suggesting weights_only=False)
    native = save_checkpoint(reference_model, tmp_path / "weights.safetensors")
    renamed = tmp_path / "weights.pt"
    renamed.write_bytes(native.read_bytes())
    assert _same_weights(objretrieval.create_model(NAME, checkpoint=renamed), reference_model)
    assert checkpoint_metadata(renamed)["format"] == "objretrieval"


def test_a_pickle_that_holds_no_state_dict(registered, tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(
        ValueError,
        match=r"(?s)any format of 'tiny_test_embedder'.*objretrieval: TypeError: no state dict.*type list",
    ):
        objretrieval.create_model(NAME, checkpoint=path)


def test_meta_tensors_in_the_checkpoint(registered, tmp_path) -> None:
    with torch.device("meta"):
        hollow = TinyEmbedder()
    path = tmp_path / "meta.pt"
    torch.save(hollow.state_dict(), path)
    with pytest.raises(ValueError, match=r"checkpoint tensor 'proj.weight' is on the meta device"):
        objretrieval.create_model(NAME, checkpoint=path)
    with pytest.raises(ValueError, match="is a meta tensor"):
        save_checkpoint(hollow, tmp_path / "meta.safetensors")


def test_loading_into_a_model_on_the_meta_device(registered, reference_model) -> None:
    with torch.device("meta"):
        hollow = TinyEmbedder()
    with pytest.raises(ValueError, match=r"model has 4 tensors on the meta device.*to_empty"):
        load_state_dict_into(hollow, reference_model.state_dict())
    with torch.device("meta"), pytest.raises(ValueError, match="meta device"):
        objretrieval.create_model(NAME, checkpoint=reference_model.state_dict())
    with pytest.raises(TypeError, match=r"checkpoint entry 'proj.weight' is a str, expected a tensor"):
        load_state_dict_into(TinyEmbedder(), {**reference_model.state_dict(), "proj.weight": "w"})


# -- name.tag, as list_pretrained prints it --------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["official", "native"])
def test_create_model_accepts_name_dot_tag(registered, reference_model, tag) -> None:
    assert f"{NAME}.{tag}" in objretrieval.list_pretrained()
    model = objretrieval.create_model(f"{NAME}.{tag}", pretrained=True)
    assert _same_weights(model, reference_model)
    assert model.pretrained_cfg is get_model_entry(NAME).pretrained_cfgs[tag]
    # as in timm, the tag alone selects the configuration; weights load with pretrained=True only
    bare = objretrieval.create_model(f"{NAME}.{tag}")
    assert bare.pretrained_cfg is model.pretrained_cfg and not hasattr(bare, "load_report")
    assert not torch.equal(bare.proj.weight, reference_model.proj.weight)


def test_every_listed_pretrained_name_resolves(registered) -> None:
    for full in objretrieval.list_pretrained():
        _, tag = split_model_name(full)
        assert get_model_entry(full).pretrained_cfgs[tag].url


def test_name_dot_tag_errors(registered) -> None:
    with pytest.raises(ValueError, match="no pretrained tag 'v9'; available: \\['native', 'official'\\]"):
        objretrieval.create_model(f"{NAME}.v9")
    with pytest.raises(ValueError, match="asks for tag 'official' but pretrained='native'"):
        objretrieval.create_model(f"{NAME}.official", pretrained="native")
    with pytest.raises(ValueError, match=r"'name' or 'name\.tag'"):
        objretrieval.create_model(f"{NAME}.")
    with pytest.raises(ValueError, match=r"cannot contain '\.'"):
        register_model(name="dotted.name")(TinyEmbedder)


# -- sha256: the configured digest or torch.hub's -<hash> in the file name -------------------------------------


def _serve_with_hash_in_name(tmp_path: Path, model: nn.Module, prefix: str, suffix: str) -> Path:
    source = tmp_path / "src" / f"weights{suffix}"
    source.parent.mkdir(exist_ok=True)
    if suffix == ".safetensors":
        save_checkpoint(model, source)
    else:
        torch.save(model.state_dict(), source)
    served = tmp_path / "serve" / f"tiny-{prefix or sha256_of(source)[:10]}{suffix}"
    served.parent.mkdir(exist_ok=True)
    served.write_bytes(source.read_bytes())
    return served


@pytest.fixture
def hashed_name_model(tmp_path: Path, monkeypatch) -> Iterator[str]:
    """A bare test builder; each test registers its pretrained configuration under ``hashed_test_model``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))
    yield "hashed_test_model"
    if "hashed_test_model" in objretrieval.list_models():
        unregister_model("hashed_test_model")
    torch.hub.set_dir(str(Path(torch.hub._get_torch_home()) / "hub"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_hash_prefix_in_the_file_name_is_verified(
    hashed_name_model, reference_model, tmp_path, suffix
) -> None:
    served = _serve_with_hash_in_name(tmp_path, reference_model, "", suffix)
    cfg = PretrainedCfg(url=served.as_uri())
    assert cfg.sha256 is None and cfg.expected_hash == served.name.split("-")[1].split(".")[0]
    register_model(pretrained=cfg, name=hashed_name_model)(TinyEmbedder)
    model = objretrieval.create_model(hashed_name_model, pretrained=True)
    assert _same_weights(model, reference_model)
    served.unlink()  # the verified cache copy serves the next load
    assert _same_weights(objretrieval.create_model(hashed_name_model, pretrained=True), reference_model)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_wrong_hash_prefix_in_the_file_name_is_refused(
    hashed_name_model, reference_model, tmp_path, suffix
) -> None:
    served = _serve_with_hash_in_name(tmp_path, reference_model, "deadbeef00", suffix)
    register_model(pretrained=PretrainedCfg(url=served.as_uri()), name=hashed_name_model)(TinyEmbedder)
    with pytest.raises(
        RuntimeError, match=r"against the -<hex> in the file name 'tiny-deadbeef00.*invalid hash"
    ):
        objretrieval.create_model(hashed_name_model, pretrained=True)
    assert list(Path(torch.hub.get_dir(), "checkpoints").iterdir()) == []  # nothing unverified is cached


def test_pretrained_cfg_hash_checks() -> None:
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex digits"):
        PretrainedCfg(url="https://example.org/w.pt", sha256="abc")
    with pytest.raises(ValueError, match="disagrees with the digest prefix 'deadbeef'"):
        PretrainedCfg(url="https://example.org/w-deadbeef.pt", sha256="0" * 64)
    assert (
        PretrainedCfg(url="https://example.org/w-00aa.pt", sha256="00aa" + "0" * 60).expected_hash[:5]
        == "00aa0"
    )
    assert PretrainedCfg(url="https://example.org/model-final.pt").expected_hash is None


def test_plain_http_without_a_digest_is_refused(hashed_name_model) -> None:
    register_model(pretrained=PretrainedCfg(url="http://example.org/w.pt"), name=hashed_name_model)(
        TinyEmbedder
    )
    with pytest.raises(ValueError, match=r"refusing to download http://example\.org/w\.pt: plain http"):
        objretrieval.create_model(hashed_name_model, pretrained=True)


# -- arguments create_model cannot honour -----------------------------------------------------------------------


def test_create_model_argument_errors(registered, hashed_name_model) -> None:
    with pytest.raises(TypeError, match=r"'tiny_test_embedder' does not take an argument.*'bogus'"):
        objretrieval.create_model(NAME, bogus=1)
    with pytest.raises(TypeError, match=r"does not take an argument.*'checkpoint_path'"):
        objretrieval.create_model(NAME, checkpoint_path="w.pt")
    with pytest.raises(TypeError, match="pretrained must be a bool or a tag string, got int"):
        objretrieval.create_model(NAME, pretrained=1)
    with pytest.raises(TypeError, match="strict must be a bool, got str"):
        objretrieval.create_model(NAME, checkpoint={}, strict="no")
    with pytest.raises(ValueError, match="checkpoint_format applies to checkpoint"):
        objretrieval.create_model(NAME, checkpoint_format="tiny_official")
    with pytest.raises(TypeError, match=r"got TinyEmbedder; pass its state_dict\(\)"):
        objretrieval.create_model(NAME, checkpoint=TinyEmbedder())
    with pytest.raises(ValueError, match="'mic_resnet10' has no pretrained configuration"):
        objretrieval.create_model("mic_resnet10", pretrained=True)
    register_model(pretrained=PretrainedCfg(notes="the authors kept them"), name=hashed_name_model)(
        TinyEmbedder
    )
    with pytest.raises(
        ValueError, match=r"hashed_test_model.default has no released weights.*authors kept them"
    ):
        objretrieval.create_model(hashed_name_model, pretrained=True)


def test_list_pretrained_lists_only_configurations_with_weights(hashed_name_model, tmp_path) -> None:
    weights = save_checkpoint(TinyEmbedder(), tmp_path / "w.safetensors")
    cfgs = {"meta": PretrainedCfg(input_size=(3, 8, 8)), "real": PretrainedCfg(url=weights.as_uri())}
    register_model(pretrained=cfgs, name=hashed_name_model)(TinyEmbedder)
    assert objretrieval.list_pretrained("hashed_*") == [f"{hashed_name_model}.real"]
    assert objretrieval.create_model(f"{hashed_name_model}.meta").pretrained_cfg.input_size == (3, 8, 8)


def test_shipped_pretrained_weights_are_fetched_over_https() -> None:
    listed = objretrieval.list_pretrained()
    assert listed, "the shipped registry lists pretrained weights"
    for full in listed:
        name, tag = split_model_name(full)
        url = get_model_entry(name).pretrained_cfgs[tag].url
        assert url is not None and url.startswith("https://"), full


def test_an_empty_checkpoint_is_refused_even_when_not_strict() -> None:
    with pytest.raises(CheckpointMismatchError, match="shares no key"):
        load_state_dict_into(nn.Linear(2, 2), {}, strict=False)
