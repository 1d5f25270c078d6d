"""Parity with the official MILE code (WACV 2025): inference model, training forward + DINO loss,
schedules, AR@K and the default checkpoint layout.

Configs, input/output names, shapes and tolerances come from the fixture manifest.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from objretrieval import create_model
from objretrieval.losses import DINOLoss
from objretrieval.metrics import RetrievalEvaluator, average_recall_at_k
from objretrieval.models import MILE, convert_official_mile
from objretrieval.models.mile import MILE_OFFICIAL, MILE_OFFICIAL_WITH_HEAD
from objretrieval.search import knn
from objretrieval.training import DINOSchedules, MILESelfSupervised, MultiCropSetBatch
from tests.parity.fixtures import (
    MethodFixtures,
    assert_close,
    fixtures_of_kind,
    method_fixtures,
    parse_tolerance,
)


@pytest.fixture(scope="module")
def mile() -> MethodFixtures:
    return method_fixtures("mile")


def tolerance_for(spec: dict[str, Any], output: str) -> tuple[float, float]:
    """The manifest tolerance whose key names ``output`` ("latents" covers ``teacher_latent``, ...)."""
    tol = spec["tolerance"]
    if not isinstance(tol, dict):
        return parse_tolerance(tol)
    parts = output.split("_")
    for key, value in tol.items():
        for token in (t.strip() for t in key.split("/")):
            singular = {token, token[:-1], token[:-2]}
            if output == token or output.startswith(token + "_") or singular & set(parts):
                return parse_tolerance(value)
    raise AssertionError(f"the manifest gives no tolerance for {output}: {sorted(tol)}")


def build_from_config(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> MILE:
    """``mile_vitl`` shrunk to the manifest's backbone/head config, loaded strictly from the official keys."""
    b = config["backbone"]
    backbone = {
        "embed_dim": b["embed_dim"],
        "depth": b["depth"],
        "num_heads": b["num_heads"],
        "patch_size": b["patch_size"],
        "img_size": b["img_size (pos_embed grid)"],
        "reg_tokens": b["num_register_tokens"],
    }
    backbone.update({k: b[k] for k in ("mlp_ratio", "qkv_bias") if k in b})
    head = config.get("final_projection", {})
    cross = config.get("latent_cross", {})
    model = create_model(
        "mile_vitl",
        checkpoint=state_dict,
        backbone_kwargs=backbone,
        lora_r=config["lora"]["r"],
        lora_alpha=config["lora"]["lora_alpha"],
        cross_heads=cross.get("num_heads", config.get("latent_cross_heads")),
        head_dim=head.get("out_dim", config.get("out_dim")),
        head_hidden_dim=head.get("hidden_dim", config.get("head_hidden")),
        head_bottleneck_dim=head.get("bottleneck_dim", config.get("head_bottleneck")),
        head_layers=head.get("nlayers", 3),
    )
    assert isinstance(model, MILE)
    return model


DINO_LOSS_OPTIONS = (
    "warmup_teacher_temp",
    "teacher_temp",
    "warmup_teacher_temp_epochs",
    "student_temp",
    "center_momentum",
)


def dino_loss(out_dim: int, ncrops: int, config: dict[str, Any], *, epochs: int) -> DINOLoss:
    """The DINO loss with every option the manifest section gives (the official defaults for the rest)."""
    return DINOLoss(
        out_dim, ncrops, epochs=epochs, **{k: config[k] for k in DINO_LOSS_OPTIONS if k in config}
    )


@pytest.mark.parametrize("name", fixtures_of_kind("mile", "model_forward", prefix=True))
def test_inference_model(mile: MethodFixtures, name: str) -> None:
    """Per-image CLS tokens, per-step set latents (forward, incremental and cached paths), head outputs."""
    spec = mile.manifest["fixtures"][name]
    files = spec["files"]
    model = build_from_config(spec["config"], mile.tensors(files["state_dict"])).eval()
    images = mile.tensors(files["inputs"])["images"]
    expected = mile.tensors(files["outputs"])
    n_obj, n_img = images.shape[:2]
    with torch.no_grad():
        cls = model.encode_images(images.flatten(0, 1)).view(n_obj, n_img, -1)
        steps = model(images, return_steps=True)
        latent = None
        incremental = []
        for t in range(n_img):
            latent = model.update(latent, images[:, t])
            incremental.append(latent)
        cached = model.aggregate(cls)
        head = model.project(steps[:, -1])
    actual = {
        "backbone_cls": cls,
        "step_latents": steps,
        "final_latent": steps[:, -1],
        "final_head": head,
    }
    for out in spec["outputs"]:
        assert_close(actual[out], expected[out], tolerance_for(spec, out), f"{name} {out}")
    assert_close(
        torch.stack(incremental, 1),
        expected["step_latents"],
        tolerance_for(spec, "step_latents"),
        "incremental",
    )
    assert_close(cached, expected["final_latent"], tolerance_for(spec, "final_latent"), "from cached CLS")


@pytest.mark.parametrize("compat", [True, False], ids=["official_batch_mixing", "per_object"])
@pytest.mark.parametrize("name", fixtures_of_kind("mile", "training forward", prefix=True))
def test_training_forward_and_loss(mile: MethodFixtures, name: str, compat: bool) -> None:
    """Student/teacher latents and head outputs, two DINO loss steps with centre updates.

    ``batch_mixing_compat=True`` reproduces the official batched student (the plain tensors); our default
    keeps objects independent and must match the manifest's ``*_per_object`` tensors.
    """
    spec = mile.manifest["fixtures"][name]
    files, config = spec["files"], spec["config"]
    student = build_from_config(config, mile.tensors(files["student_state_dict"]))
    teacher = build_from_config(config, mile.tensors(files["teacher_state_dict"]))
    dino = config["dino_loss"]
    loss = dino_loss(
        config["out_dim"], config["ncrops"], dino, epochs=max(1, dino["warmup_teacher_temp_epochs"])
    )
    ssl = MILESelfSupervised(student, loss, teacher=teacher, batch_mixing_compat=compat)
    ssl.eval()  # the fixture ran both models in eval mode (no LoRA dropout)
    ssl.loss.train()  # ... and the loss updates its centre
    inputs = mile.tensors(files["inputs"])
    # fixture layout (K, crops, B, ...) -> ours (B, K, crops, ...)
    batch = MultiCropSetBatch(
        inputs["global_crops"].permute(2, 0, 1, 3, 4, 5), inputs["local_crops"].permute(2, 0, 1, 3, 4, 5)
    )
    expected = mile.tensors(files["outputs"])
    with torch.no_grad():
        first = ssl(batch, epoch=0)
        center1 = ssl.loss.center.clone()
        second = ssl(batch, epoch=0)
    if compat:
        actual = {
            "student_latent": first.student_latent,
            "student_output": first.student_output,
            "teacher_latent": first.teacher_latent,
            "teacher_output": first.teacher_output,
            "loss_step1": first.loss,
            "center_after_step1": center1,
            "loss_step2": second.loss,
            "center_after_step2": ssl.loss.center,
        }
    else:
        actual = {
            "student_output_per_object": first.student_output,
            "teacher_output_per_object": first.teacher_output,
            "loss_per_object": first.loss,
        }
    for out, value in actual.items():
        assert out in spec["outputs"], f"{out} is not in the manifest"
        assert_close(value, expected[out], tolerance_for(spec, out), f"{name} {out}")


@pytest.mark.parametrize("name", fixtures_of_kind("mile", "loss function", prefix=True))
def test_dino_loss(mile: MethodFixtures, name: str) -> None:
    """Two successive calls at different epochs: temperature warm-up, centring and the centre updates."""
    spec = mile.manifest["fixtures"][name]
    config = spec["config"]
    inputs = mile.tensors(spec["files"]["inputs"])
    expected = mile.tensors(spec["files"]["outputs"])
    loss = dino_loss(config["out_dim"], config["ncrops"], config, epochs=config["epochs"])
    actual = {"teacher_temp_schedule": torch.from_numpy(loss.teacher_temp_schedule)}
    for call in (1, 2):
        actual[f"loss_call{call}"] = loss(
            inputs["student_output"], inputs["teacher_output"], config[f"epoch_call{call}"]
        )
        actual[f"center_after_call{call}"] = loss.center.clone()
    for out in spec["outputs"]:
        assert_close(actual[out], expected[out], tolerance_for(spec, out), f"{name} {out}")


@pytest.mark.parametrize("name", fixtures_of_kind("mile", "per-iteration schedules"))
def test_schedules(mile: MethodFixtures, name: str) -> None:
    spec = mile.manifest["fixtures"][name]
    c = spec["config"]
    schedules = DINOSchedules.create(
        epochs=c["epochs"],
        iters_per_epoch=c["niter_per_ep"],
        lr=c["lr"],
        min_lr=c["min_lr"],
        warmup_epochs=c["warmup_epochs"],
        weight_decay=c["weight_decay"],
        weight_decay_end=c["weight_decay_end"],
        momentum_teacher=c["momentum_teacher"],
        world_size=c["world_size"],
    )
    expected = mile.tensors(spec["files"]["outputs"])
    actual = {"lr": schedules.lr, "wd": schedules.weight_decay, "momentum": schedules.momentum}
    for out in spec["outputs"]:
        assert_close(torch.from_numpy(actual[out]), expected[out], tolerance_for(spec, out), f"{name} {out}")


@pytest.mark.parametrize("name", fixtures_of_kind("mile", "metric"))
def test_average_recall_at_k(mile: MethodFixtures, name: str) -> None:
    spec = mile.manifest["fixtures"][name]
    inputs = mile.tensors(spec["files"]["inputs"])
    expected = mile.tensors(spec["files"]["outputs"])
    k = spec["config"]["k_max"]
    tolerance = parse_tolerance(spec["tolerance"])
    # MILE ranks by raw inner product of un-normalised set embeddings.
    scores, indices = knn(inputs["query_embeddings"], inputs["gallery_embeddings"], k=k, metric="ip")
    result = average_recall_at_k(scores, indices, inputs["query_labels"], inputs["gallery_labels"])
    assert_close(result.recalls, expected["recalls"], tolerance, f"{name} recalls")
    assert_close(result.mean, expected["mean_recall"], tolerance, f"{name} AR@{k}")

    evaluated = RetrievalEvaluator([f"ar@{k}"], metric="ip")(
        inputs["query_embeddings"],
        inputs["query_labels"],
        inputs["gallery_embeddings"],
        inputs["gallery_labels"],
    )
    assert_close(evaluated[f"ar@{k}"], expected["mean_recall"], tolerance, f"{name} evaluator AR@{k}")


def _key_listings(mile: MethodFixtures) -> list[dict[str, Any]]:
    """The key listings the manifest names (entries that are .json files, not tensor fixtures)."""
    names = [name for name in mile.manifest["fixtures"] if name.endswith(".json")]
    assert names, f"the manifest in {mile.dir} names no state-dict key listing"
    return [mile.json(name) for name in names]


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_default_checkpoint_layout_loads_strictly(mile: MethodFixtures) -> None:
    """The released architecture's keys (teacher container) convert to exactly mile_vitl's keys and shapes,
    with and without the DINO head: what a strict load checks, without materialising 300M parameters."""
    for listing in _key_listings(mile):
        keys = listing["keys"]
        assert len(keys) == listing["n_tensors"]
        assert sum(torch.Size(v["shape"]).numel() for v in keys.values()) == listing["n_elements"]
        with torch.device("meta"):  # shapes only: loading refuses meta tensors, so compare keys and shapes
            official = {k: torch.empty(v["shape"]) for k, v in keys.items()}
            head_shape = official["final_projection.last_layer.weight_v"].shape
            retrieval = create_model("mile_vitl")
            with_head = create_model("mile_vitl", head_dim=head_shape[0], head_bottleneck_dim=head_shape[1])
        assert isinstance(retrieval, MILE) and isinstance(with_head, MILE)
        converted = MILE_OFFICIAL.convert({"teacher": official, "epoch": 390})  # what create_model applies
        assert _shapes(dict(converted)) == _shapes(retrieval.state_dict())
        converted = MILE_OFFICIAL_WITH_HEAD.convert({"teacher": official})
        assert _shapes(dict(converted)) == _shapes(with_head.state_dict())
        lora = sum(p.numel() for n, p in retrieval.backbone.named_parameters() if p.requires_grad)
        assert lora == listing["lora_trainable_params_in_backbone"]
        # DDP-prefixed student keys convert the same way
        student = convert_official_mile({f"module.{k}": v for k, v in official.items()}, keep_head=False)
        assert _shapes(student) == _shapes(retrieval.state_dict())
