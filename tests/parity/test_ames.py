"""Parity with the official AMES code (Suma et al., ECCV 2024): revisited Oxford/Paris protocol, model.

Rankings, ground truth, kappas, expected tensors and tolerances are all read from the fixture manifest.
"""

from __future__ import annotations

import re

import pytest
import torch

from objretrieval import create_model
from objretrieval.descriptors import (
    ScaleFeatures,
    SpatialAttention2d,
    global_descriptor,
    patch_locations,
    receptive_field_centres,
    select_top,
)
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

    def model(self) -> AMES:
        """Our AMES built from the manifest config, loading the official checkpoint layout strictly."""
        config = dict(self.spec["config"])
        model = create_model("dinov2_ames", checkpoint={"state": self.state}, **config)
        assert isinstance(model, AMES)
        return model

    def args(self, suffix: str = "") -> tuple:
        i = self.inputs
        src = self.outputs[f"src_local{suffix}"] if suffix else i["src_local"]
        tgt = self.outputs[f"tgt_local{suffix}"] if suffix else i["tgt_local"]
        return src, tgt, i["src_mask"].bool(), i["tgt_mask"].bool()


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "model_forward"))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_model_forward(ames: MethodFixtures, name: str, mode: str) -> None:
    case = ModelCase(ames, name)
    model = case.model()
    getattr(model, mode)()
    with torch.no_grad():
        sim, logits = model(*case.args(), return_logits=True)
        score_only = model(*case.args())
    assert_close(sim, case.outputs[f"sim_{mode}"], case.sim_tol, f"{name} sim ({mode})")
    assert_close(logits, case.outputs[f"logits_{mode}"], case.logits_tol, f"{name} token states ({mode})")
    assert_close(score_only, case.outputs[f"sim_{mode}"], case.sim_tol, f"{name} score-only path ({mode})")


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "model_forward"))
def test_model_eval_side_outputs(ames: MethodFixtures, name: str) -> None:
    """Projections, padding that never leaks, asymmetry, and the cached reranking path."""
    case = ModelCase(ames, name)
    model = case.model().eval()
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


# --- local-descriptor selection ---------------------------------------------------------------------------------


def _extraction_case(ames: MethodFixtures, name: str) -> tuple[dict, dict, tuple[float, float]]:
    spec = ames.manifest["fixtures"][name]
    tolerance = spec["tolerance"]
    local_tol = parse_tolerance(
        re.search(r"atol [0-9.e-]+ on out_local", tolerance)[0].removesuffix(" on out_local")
    )
    return spec, ames.tensors(spec["files"]["tensors"]), local_tol


@pytest.mark.parametrize("name", fixtures_of_kind("ames", "local_descriptor_extraction"))
def test_local_descriptor_selection(ames: MethodFixtures, name: str) -> None:
    """Backbone features (stored) -> detector or norms -> locations -> joint top-k rows, globals."""
    spec, t, local_tol = _extraction_case(ames, name)
    global_tol = parse_tolerance(
        re.search(r"atol [0-9.e-]+ on out_global", spec["tolerance"])[0].split(" on")[0]
    )
    channels = int(re.search(r"C=(\d+)", spec["backbone"])[1])
    if spec["backbone"].startswith("dinov2"):  # one scale of patch tokens, optionally through the detector
        patch = int(re.search(r"patch (\d+)", spec["backbone"])[1])
        detector = None
        if spec["detector"]:
            detector = SpatialAttention2d(channels).eval()
            prefix = "detector."
            detector.load_state_dict(
                {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, strict=True
            )
        for i, (height, width) in enumerate(spec["image_sizes_HW"]):
            tokens = t[f"img{i}_patch_tokens"]
            grid = (height // patch, width // patch)
            if detector is not None:
                descriptors, weights = detector.describe(tokens.T.reshape(channels, *grid))
            else:
                descriptors, weights = tokens, tokens.norm(dim=1)
            features = [ScaleFeatures(descriptors, weights, patch_locations(grid, (height, width), patch))]
            assert_close(select_top(features, spec["topk"]), t["out_local"][i], local_tol, f"{name} rows {i}")
            assert_close(global_descriptor(features), t["out_global"][i], global_tol, f"{name} global {i}")
            cls = torch.nn.functional.normalize(t[f"img{i}_cls_token"], dim=0)
            assert_close(cls, t["out_cls"][i], global_tol, f"{name} cls {i}")
    else:  # CVNet: several scales of res4 maps, no detector, receptive-field centres
        features = []
        for i, scale in enumerate(spec["scales"]):
            feature_map = t[f"scale{i}_feature_map"]
            assert feature_map.shape[0] == channels
            descriptors = feature_map.flatten(1).T
            grid = tuple(feature_map.shape[1:])
            features.append(
                ScaleFeatures(descriptors, descriptors.norm(dim=1), receptive_field_centres(grid, scale))
            )
        assert_close(select_top(features, spec["topk"]), t["out_local"][0], local_tol, f"{name} rows")
