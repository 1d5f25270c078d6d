"""Parity with the official AMES code (Suma et al., ECCV 2024): revisited Oxford/Paris protocol, model.

Rankings, ground truth, kappas, expected tensors and tolerances are all read from the fixture manifest.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from objretrieval import create_model
from objretrieval.descriptors import CVNetLocalExtractor, DINOv2LocalExtractor, SpatialAttention2d
from objretrieval.metrics import mean_average_precision, revisited_map
from objretrieval.models import AMES
from objretrieval.reranking import Shortlist, rerank_revisited, score_table
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    fixtures_of_kind,
    method_fixtures,
    parse_tolerance,
)

PROTOCOL_KEYS = {"E": "easy", "M": "medium", "H": "hard"}
RESULT_FIELDS = {"map": "map", "aps": "ap", "mpk": "mean_precision", "prk": "precision"}


@pytest.fixture(scope="module")
def ames() -> MethodFixtures:
    return method_fixtures("ames")


class RevisitedCase:
    """One revisited_map fixture: its manifest entry, tensors, ground truth, tolerance and rankings."""

    def __init__(self, ames: MethodFixtures, name: str) -> None:
        self.spec = ames.manifest["fixtures"][name]
        self.tensors = ames.tensors(self.spec["files"]["tensors"])
        self.gnd = ames.json(self.spec["files"]["gnd"])
        self.tolerance = parse_tolerance(self.spec["tolerance"])
        # ranks_<r> tensors as (num_queries, depth) rows; the official layout is (db, nq)
        self.rankings = {
            n[len("ranks_") :]: self.tensors[n].T for n in self.spec["tensors"] if n.startswith("ranks_")
        }

    def expected(self, pattern: str) -> list[tuple[re.Match, object]]:
        """(match, tensor) for every manifest tensor whose name matches ``pattern``."""
        matches = [(re.match(pattern, n), self.tensors[n]) for n in self.spec["tensors"]]
        found = [(m, t) for m, t in matches if m is not None]
        assert found, f"no tensors matching {pattern} in the manifest"
        return found


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "revisited_map"))
def test_revisited_protocols(ames: MethodFixtures, name: str) -> None:
    case = RevisitedCase(ames, name)
    spec, gnd, tolerance, rankings = case.spec, case.gnd, case.tolerance, case.rankings
    results = {r: revisited_map(ranking, gnd, kappas=spec["kappas"]) for r, ranking in rankings.items()}
    for m, expected in case.expected(r"^(?P<ranking>\w+?)_(?P<protocol>[EMH])_(?P<field>map|aps|mpk|prk)$"):
        protocol = getattr(results[m["ranking"]], PROTOCOL_KEYS[m["protocol"]])
        assert_close(getattr(protocol, RESULT_FIELDS[m["field"]]), expected, tolerance, m.string)

    for ranking_name, rounded in spec["compute_metrics_rounded_outputs"].items():
        summary = results[ranking_name].summary()
        for key, value in rounded.items():
            if key in summary:
                assert summary[key] == value, f"{ranking_name} {key}: {summary[key]} != {value}"
        score_key = next(k for k in rounded if k.startswith("returned_score"))
        res = results[ranking_name]
        assert_close((res.medium.map + res.hard.map) / 2, rounded[score_key], tolerance, score_key)


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "revisited_map"))
def test_rectangular_ap_without_junk(ames: MethodFixtures, name: str) -> None:
    """GLDv2-style rectangular AP with relevant = easy + hard and no junk."""
    case = RevisitedCase(ames, name)
    positives = [list(g["easy"]) + list(g["hard"]) for g in case.gnd]
    for m, expected in case.expected(r"^(?P<ranking>\w+?)_rectangular_okOnly_(?P<field>map|aps)$"):
        result = mean_average_precision(case.rankings[m["ranking"]], positives, kind="rectangular")
        assert_close(getattr(result, RESULT_FIELDS[m["field"]]), expected, case.tolerance, m.string)


# --- the model ------------------------------------------------------------------------------------------------


class ModelCase:
    """One model_forward fixture: config, official state dict, inputs, expected outputs, tolerances."""

    def __init__(self, ames: MethodFixtures, name: str) -> None:
        self.spec = ames.manifest["fixtures"][name]
        files = self.spec["files"]
        self.state = ames.tensors(files["state_dict"])
        self.inputs = ames.tensors(files["inputs"])
        self.outputs = ames.tensors(files["outputs"])
        tol = self.spec["tolerance"]
        self.sim_tol = parse_tolerance(tol["sim"])
        self.logits_tol = parse_tolerance(next(v for k, v in tol.items() if k.startswith("logits")))
        self.remap_tol = parse_tolerance(tol["remap"])
        for group in ("inputs", "outputs", "state_dict"):
            loaded = {"inputs": self.inputs, "outputs": self.outputs, "state_dict": self.state}[group]
            for tensor, meta in self.spec[group].items():
                assert list(loaded[tensor].shape) == meta["shape"], f"{name} {group}: {tensor}"

    def model(self, attention: str = "dense") -> AMES:
        """Our AMES built from the manifest config, loading the official checkpoint layout strictly."""
        config = dict(self.spec["config"])
        model = create_model("dinov2_ames", checkpoint={"state": self.state}, attention=attention, **config)
        assert isinstance(model, AMES)
        return model

    def args(self, suffix: str = "") -> tuple:
        i = self.inputs
        src = self.outputs[f"src_local{suffix}"] if suffix else i["src_local"]
        tgt = self.outputs[f"tgt_local{suffix}"] if suffix else i["tgt_local"]
        return src, tgt, i["src_mask"].bool(), i["tgt_mask"].bool()


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "model_forward"))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_model_forward(ames: MethodFixtures, name: str, mode: str, attention: str) -> None:
    case = ModelCase(ames, name)
    model = case.model(attention)
    getattr(model, mode)()
    with torch.no_grad():
        sim, logits = model(*case.args(), return_logits=True)
        score_only = model(*case.args())
    assert_close(sim, case.outputs[f"sim_{mode}"], case.sim_tol, f"{name} sim ({mode})")
    assert_close(logits, case.outputs[f"logits_{mode}"], case.logits_tol, f"{name} token states ({mode})")
    assert_close(score_only, case.outputs[f"sim_{mode}"], case.sim_tol, f"{name} score-only path ({mode})")


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "model_forward"))
@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_model_eval_side_outputs(ames: MethodFixtures, name: str, attention: str) -> None:
    """Projections, padding that never leaks, asymmetry, and the cached reranking path."""
    case = ModelCase(ames, name)
    model = case.model(attention).eval()
    src, tgt, src_mask, tgt_mask = case.args()
    with torch.no_grad():
        assert_close(model.remap(src), case.outputs["remap_src_eval"], case.remap_tol, "query projection")
        assert_close(model.remap(tgt), case.outputs["remap_tgt_eval"], case.remap_tol, "database projection")
        garbage = model(*case.args("_padded_garbage"))
        swapped = model(tgt, src, tgt_mask, src_mask)
        cached = model.score(model.project_query(src, src_mask), model.project_database(tgt, tgt_mask))
    assert_close(garbage, case.outputs["sim_eval_padded_garbage"], case.sim_tol, "padded garbage")
    assert_close(garbage, case.outputs["sim_eval"], case.sim_tol, "padding must not leak")
    assert_close(swapped, case.outputs["sim_eval_swapped"], case.sim_tol, "swapped roles")
    assert_close(cached, case.outputs["sim_eval"], case.sim_tol, "projected once, scored from the cache")


def test_default_checkpoint_layouts_load_strictly(ames: MethodFixtures) -> None:
    """The four released architectures: our builders have exactly the official keys, shapes and sizes."""
    (name,) = fixtures_of_kind("ames", "key_listing")
    listing = ames.json(ames.manifest["fixtures"][name]["files"]["json"])
    for model_name, entry in listing.items():
        model = create_model(model_name)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: v["shape"] for k, v in entry["state_dict"].items()}, model_name
        assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"], model_name
        official = {"state": {k: torch.randn(v["shape"]) for k, v in entry["state_dict"].items()}, "epoch": 3}
        loaded = create_model(model_name, checkpoint=official)
        assert torch.equal(loaded.state_dict()["mtc_token"], official["state"]["mtc_token"])


# --- reranking ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "rerank_combination"))
def test_rerank_pipeline(ames: MethodFixtures, name: str) -> None:
    """Junk reordering, raw scores along the shortlist, fusion and re-sorting, metrics of every combination."""
    spec = ames.manifest["fixtures"][name]
    t = ames.tensors(spec["files"]["tensors"])
    gnd = ames.json(spec["files"]["gnd"])
    result = rerank_revisited(
        score_table(t["pair_scores_S"]),
        Shortlist.from_official(t["cache_nn"]),
        gnd,
        top_k=spec["top_k"],
        lamb=spec["lamb"],
        temp=spec["temp"],
        kappas=spec["kappas"],
    )
    exact = (0.0, 0.0)  # the manifest: "ranks exact; raw_sim exact"
    for mode, raw in result.raw.items():
        assert_close(raw, t[f"raw_sim_{mode}"], exact, f"raw scores of the {mode} run")
    by_setting = {(c.k, c.lamb, c.temp): c for c in result.combinations}
    assert len(by_setting) == len(spec["top_k"]) * len(spec["lamb"]) * len(spec["temp"])
    for expected in spec["per_combination"]:
        combination = by_setting[expected["k"], expected["lamb"], expected["temp"]]
        mode = expected["mode"]
        ranking = combination.rankings[mode]
        assert torch.equal(ranking.T, t[expected["ranks_tensor"]]), expected["ranks_tensor"]
        summary = getattr(combination, mode).summary()
        for key in ("E_map", "M_map", "H_map", "E_mp", "M_mp", "H_mp"):
            assert summary[key] == expected[key], f"{expected['ranks_tensor']} {key}"
        run_score = (getattr(combination, mode).medium.map + getattr(combination, mode).hard.map) / 2
        # "metrics exact after rounding to 3 decimals" (of the percentages)
        assert round(100 * run_score, 3) == round(100 * expected["returned_score"], 3), "official score"


# --- local-descriptor extraction ------------------------------------------------------------------------------
# The official extraction ran with its backbone stubbed to return stored features; ours runs the library's
# extractors with the same stub in place of the timm / torchvision backbone.


class _StoredViT(nn.Module):
    """A ViT stand-in returning an image's stored class and patch tokens (after checking the input size)."""

    def __init__(
        self, cls: torch.Tensor, patches: torch.Tensor, image_hw: tuple[int, int], patch: int
    ) -> None:
        super().__init__()
        self.patch_embed = SimpleNamespace(patch_size=(patch, patch))
        self.num_prefix_tokens = 1
        self.device_anchor = nn.Parameter(torch.zeros(()))  # the extractor reads the device off a parameter
        self.tokens = torch.cat([cls[None], patches])[None]
        self.image_hw = image_hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[2:]) == self.image_hw, "the extractor resized an already snapped image"
        return self.tokens


class _StoredCNN(nn.Module):
    """A CVNet stand-in returning the stored res4 map of each scale, in the order the scales are run."""

    def __init__(self, maps: list[torch.Tensor]) -> None:
        super().__init__()
        self.maps = maps
        self.device_anchor = nn.Parameter(torch.zeros(()))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.maps.pop(0)
        return feature_map[None], feature_map.mean(dim=(1, 2))[None]


def _tolerance_on(tolerance: str, tensor: str) -> tuple[float, float]:
    """The manifest's ``atol <x> on <tensor>[/...]`` tolerance of one output tensor."""
    for clause in tolerance.split(","):
        if re.search(rf"\bon\b.*\b{tensor}\b", clause):
            return parse_tolerance(clause.split(" on ")[0].split("(")[0].strip())
    raise KeyError(f"no tolerance for {tensor} in {tolerance!r}")


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "local_descriptor_extraction"))
def test_local_descriptor_extraction(ames: MethodFixtures, name: str) -> None:
    """Backbone features (stored) -> detector or norms -> locations -> joint top-k rows, globals."""
    spec = ames.manifest["fixtures"][name]
    t = ames.tensors(spec["files"]["tensors"])
    for tensor, meta in spec["tensors"].items():
        assert list(t[tensor].shape) == meta["shape"], f"{name}: {tensor}"
    local_tol = _tolerance_on(spec["tolerance"], "out_local")
    channels = int(re.search(r"C=(\d+)", spec["backbone"])[1])
    if spec["backbone"].startswith("dinov2"):
        patch = int(re.search(r"patch (\d+)", spec["backbone"])[1])
        global_tol = _tolerance_on(spec["tolerance"], "out_global")
        cls_tol = _tolerance_on(spec["tolerance"], "out_cls")
        detector = None
        if spec["detector"]:
            detector = SpatialAttention2d(channels)
            prefix = "detector."
            detector.load_state_dict(
                {k[len(prefix) :]: t[k] for k in spec["tensors"] if k.startswith(prefix)}, strict=True
            )
        for i, (height, width) in enumerate(spec["image_sizes_HW"]):
            backbone = _StoredViT(t[f"img{i}_cls_token"], t[f"img{i}_patch_tokens"], (height, width), patch)
            extractor = DINOv2LocalExtractor(backbone, detector=detector, topk=spec["topk"])
            rows, global_, cls = extractor(torch.rand(3, height, width))
            assert_close(rows, t["out_local"][i], local_tol, f"{name} rows {i}")
            assert_close(global_, t["out_global"][i], global_tol, f"{name} global {i}")
            assert_close(cls, t["out_cls"][i], cls_tol, f"{name} cls {i}")
    else:  # CVNet: several scales of res4 maps, no detector, receptive-field centres
        maps = [t[f"scale{i}_feature_map"] for i in range(len(spec["scales"]))]
        assert [list(m.shape[1:]) for m in maps] == spec["feature_map_sizes_hw"]
        backbone = _StoredCNN(maps)
        extractor = CVNetLocalExtractor(backbone, topk=spec["topk"], scales=spec["scales"])  # type: ignore[arg-type]
        rows, _, _ = extractor(torch.rand(3, 64, 96))
        assert not backbone.maps, "every scale ran once"
        assert_close(rows, t["out_local"][0], local_tol, f"{name} rows")
