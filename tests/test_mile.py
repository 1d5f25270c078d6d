"""MILE: the aggregator, masks, incremental API, checkpoints, DINO loss and the self-supervised step."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from objretrieval import create_model
from objretrieval.losses import DINOLoss
from objretrieval.models import MILE, MILEAggregator, convert_official_mile
from objretrieval.training import (
    DINOSchedules,
    MILESelfSupervised,
    MultiCropSetBatch,
    clip_gradients_per_tensor,
    ema_update,
    weight_decay_groups,
)

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 56}


def tiny_mile(**overrides) -> MILE:
    torch.manual_seed(0)
    model = create_model("mile_vits", backbone_kwargs=TINY, **overrides)
    with torch.no_grad():  # PEFT zero-initialises lora_B and the gate starts at 0: make both matter
        for name, p in model.named_parameters():
            if "lora_B" in name or name.endswith("gate_alpha"):
                p.normal_(0, 0.3)
    assert isinstance(model, MILE)
    return model.eval()


def test_one_key_attention_shortcut_equals_multihead_attention() -> None:
    """With one key per object, attention is out_proj(v): the shortcut equals torch's MHA on 1-long sequences."""
    torch.manual_seed(0)
    agg = MILEAggregator(16, num_heads=2)
    with torch.no_grad():
        agg.gate_alpha.fill_(0.3)
    latent, feats = torch.randn(5, 16), torch.randn(5, 16)
    mixed = agg.step_mixed(latent[:, None], feats[:, None])[:, 0]
    torch.testing.assert_close(agg.step(latent, feats), mixed, rtol=1e-5, atol=1e-6)
    # batch mixing (one sequence of 5) differs: each latent then attends over every object's view
    assert not torch.allclose(agg.step_mixed(latent[None], feats[None])[0], mixed, atol=1e-4)


def test_padding_mask_equals_the_shorter_set_and_skips_padded_images() -> None:
    model = tiny_mile()
    images = torch.randn(2, 4, 3, 28, 28)
    mask = torch.tensor([[False, False, False, False], [True, False, True, False]])
    images[1, 0] = float("nan")  # padded images never reach the backbone
    images[1, 2] = float("nan")
    with torch.no_grad():
        out = model(images, mask)
        full = model(images[:1])
        short = model(images[1:, [1, 3]])
    torch.testing.assert_close(out[0], full[0])
    torch.testing.assert_close(out[1], short[0], rtol=1e-5, atol=1e-6)


def test_incremental_update_and_order_dependence() -> None:
    model = tiny_mile()
    images = torch.randn(3, 5, 3, 28, 28)
    with torch.no_grad():
        steps = model(images, return_steps=True)
        feats = model.encode_images(images.flatten(0, 1)).view(3, 5, -1)
        latent = None
        for t in range(5):
            latent = model.update(latent, features=feats[:, t])
            torch.testing.assert_close(latent, steps[:, t], rtol=1e-5, atol=1e-6)
        reversed_order = model(images.flip(1))
    assert (reversed_order - steps[:, -1]).abs().max() > 1e-3  # the set embedding depends on the order


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny_mile()
    with pytest.raises(ValueError, match=r"images must be \(B, N, 3, H, W\)"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        model(torch.randn(1, 2, 3, 28, 28), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 2\)"):
        model(torch.randn(1, 2, 3, 28, 28), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: set 0 is entirely padding"):
        model.aggregate(torch.randn(2, 2, 32), torch.tensor([[True, True], [False, True]]))
    with pytest.raises(ValueError, match="exactly one of images and features"):
        model.update(None)
    with pytest.raises(ValueError, match=r"latent has shape"):
        model.update(torch.randn(2, 32), features=torch.randn(3, 32))
    with pytest.raises(RuntimeError, match="no head"):
        model.project(torch.randn(1, 32))


def test_non_finite_inputs_and_fully_padded_sets_raise_naming_the_set() -> None:
    """One rule on every entry point: NaN/inf in a real image or embedding, or a set of padding only, raises."""
    model = tiny_mile()
    images = torch.randn(3, 2, 3, 28, 28)
    images[1, 1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"images contains NaN or inf values \(first at row 1\)"):
        model(images)
    with pytest.raises(ValueError, match=r"images contains NaN or inf values \(first at row 1\)"):
        model.encode_sets(images)
    with pytest.raises(ValueError, match=r"images contains NaN or inf values \(first at row 1\)"):
        model.update(None, images[:, 1])
    padded_nan = torch.tensor([[False, False], [False, True], [False, False]])
    assert torch.isfinite(model(images, padded_nan)).all()  # the NaN image is padding: never read

    all_padded = torch.tensor([[False, False], [False, False], [True, True]])
    for call in (model, model.encode_sets):
        with pytest.raises(ValueError, match="mask: set 2 is entirely padding"):
            call(images.nan_to_num(), all_padded)

    features = torch.randn(3, 2, 32)
    features[2, 0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"features contains NaN or inf values \(first at row 2\)"):
        model.aggregate(features)
    torch.testing.assert_close(  # a padded inf slot is skipped like any padding
        model.aggregate(features, torch.tensor([[False, False], [False, False], [True, False]]))[2],
        features[2, 1],
    )
    with pytest.raises(ValueError, match=r"features contains NaN or inf values \(first at row 2\)"):
        model.update(None, features=features[:, 0])
    latent = torch.randn(3, 32)
    latent[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"latent contains NaN or inf values \(first at row 0\)"):
        model.update(latent, features=features[:, 1])


def test_merge_lora_keeps_the_output() -> None:
    model = tiny_mile()
    images = torch.randn(2, 3, 3, 28, 28)
    with torch.no_grad():
        before = model(images)
        merged = model.merge_lora()(images)
        unmerged = model.merge_lora(False)(images)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmerged, before, rtol=1e-4, atol=1e-5)


def official_state(model: MILE) -> dict[str, torch.Tensor]:
    """Our state dict written back in the official key layout (a DINOv2 ViT wrapped by PEFT)."""
    prefix = "backbone.backbone.base_model.model."
    state = model.state_dict()
    pos = state["backbone.pos_embed"]
    class_pos = torch.full_like(pos[:, :1], 0.25)  # DINOv2 keeps it in pos_embed; timm folds it into cls
    out: dict[str, torch.Tensor] = {"dual_gate_alpha": torch.tensor(0.0)}
    for key, value in state.items():
        if key.startswith("backbone."):
            k = key[len("backbone.") :]
            if k == "pos_embed":
                value = torch.cat([class_pos, value], dim=1)
            elif k == "cls_token":
                value = value - class_pos
            out[prefix + k.replace("reg_token", "register_tokens")] = value
        elif key == "aggregator.gate_alpha":
            out["gate_alpha"] = value
        elif key.startswith("aggregator."):
            out["latent_cross." + key[len("aggregator.") :]] = value
        elif key.startswith("head."):
            k = key.replace("parametrizations.weight.original0", "weight_g")
            out[
                "final_projection."
                + k[len("head.") :].replace("parametrizations.weight.original1", "weight_v")
            ] = value
    out[prefix + "mask_token"] = torch.zeros(1, pos.shape[-1])
    return out


def test_official_training_checkpoint_loads_with_its_pickled_arguments(tmp_path) -> None:
    """{'student' (DDP prefix), 'teacher', 'args': Namespace, ...}: the teacher is read, weights_only stays on."""
    source = tiny_mile(head_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    teacher = official_state(source)
    student = {f"module.{k}": v + 1 for k, v in teacher.items()}
    path = tmp_path / "checkpoint0390.pth"
    torch.save(
        {
            "student": student,
            "teacher": teacher,
            "epoch": 390,
            "args": argparse.Namespace(lr=5e-6),
            "dino_loss": {},
        },
        path,
    )
    plain = create_model("mile_vits", checkpoint=path, backbone_kwargs=TINY)
    with_head = create_model(
        "mile_vits",
        checkpoint=path,
        backbone_kwargs=TINY,
        head_dim=64,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
    )
    for name, value in source.state_dict().items():
        torch.testing.assert_close(with_head.state_dict()[name], value, msg=name)
        if not name.startswith("head."):
            torch.testing.assert_close(plain.state_dict()[name], value, msg=name)
    converted = convert_official_mile(student)  # DDP student keys convert too
    torch.testing.assert_close(converted["aggregator.gate_alpha"], source.aggregator.gate_alpha + 1)
    with pytest.raises(KeyError, match="gate_alpha"):
        convert_official_mile({"weight": torch.zeros(1)})


def test_dino_loss_centre_and_errors() -> None:
    loss = DINOLoss(8, ncrops=4, epochs=3)
    s, t = torch.randn(12, 8), torch.randn(6, 8)
    value = loss(s, t, epoch=0)
    torch.testing.assert_close(loss.center, 0.1 * t.mean(0, keepdim=True))
    # a direct double loop over (teacher view, other student view) pairs
    targets = torch.softmax(t / 0.07, dim=-1).chunk(2)
    log_probs = torch.log_softmax(s / 0.1, dim=-1).chunk(4)
    terms = [(-q * log_probs[v]).sum(-1).mean() for iq, q in enumerate(targets) for v in range(4) if v != iq]
    torch.testing.assert_close(value, torch.stack(terms).mean())
    loss.eval()
    centre = loss.center.clone()
    loss(s, t, epoch=1)
    assert torch.equal(loss.center, centre)  # no centre update outside training
    with pytest.raises(ValueError, match="epoch must be in"):
        loss(s, t, epoch=3)
    with pytest.raises(ValueError, match="student_output must be"):
        loss(torch.randn(12, 9), t, epoch=0)
    with pytest.raises(ValueError, match="not a multiple of ncrops"):
        loss(torch.randn(10, 8), t, epoch=0)
    bad_student, bad_teacher = s.clone(), t.clone()
    bad_student[5, 2], bad_teacher[4, 0] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"student_output contains NaN or inf values \(first at row 5\)"):
        loss(bad_student, t, epoch=0)
    with pytest.raises(ValueError, match=r"teacher_output contains NaN or inf values \(first at row 4\)"):
        loss(s, bad_teacher, epoch=0)
    with pytest.raises(ValueError, match=r"student_temp must lie in \(0, inf\)"):
        DINOLoss(8, ncrops=4, student_temp=0.0)
    with pytest.raises(ValueError, match=r"center_momentum must lie in \[0, 1\]"):
        DINOLoss(8, ncrops=4, center_momentum=1.5)
    with pytest.raises(ValueError, match="ncrops must be >= 2"):
        DINOLoss(8, ncrops=1)
    with pytest.raises(ValueError, match="teacher_output: the global batch is empty"):
        loss.update_center(torch.empty(0, 8))  # a centre of 0 / 0 would be NaN from then on
    assert torch.isfinite(loss.center).all()


def test_dino_loss_dtype_rule_float64_stays_float64_half_computes_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(12, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 8, generator=g, dtype=torch.float64),
    )
    targets = torch.softmax(t / 0.07, dim=-1).chunk(2)
    log_probs = torch.log_softmax(s / 0.1, dim=-1).chunk(4)
    terms = [(-q * log_probs[v]).sum(-1).mean() for iq, q in enumerate(targets) for v in range(4) if v != iq]
    value = DINOLoss(8, ncrops=4, epochs=1)(s, t, epoch=0)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)
    half = DINOLoss(8, ncrops=4, epochs=1)(s.bfloat16(), t.bfloat16(), epoch=0)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), value, rtol=0.05, atol=0.05)  # bfloat16 inputs: 8-bit mantissa


def test_parameter_groups_clipping_and_ema() -> None:
    model = tiny_mile(head_dim=16, head_hidden_dim=8, head_bottleneck_dim=4)
    decayed, plain = weight_decay_groups(model)
    decayed_ids = {id(p) for p in decayed["params"]}
    assert id(model.aggregator.gate_alpha) in decayed_ids  # 0-d, decayed as upstream does
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    frozen = model.backbone.blocks[0].mlp.fc1.weight
    assert not frozen.requires_grad and id(frozen) not in decayed_ids

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad, params[1].grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])
    norms = clip_gradients_per_tensor(params, 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 4.0, 0.0]) / (5 + 1e-6))
    torch.testing.assert_close(params[1].grad, torch.tensor([0.3, 0.4, 0.0]))  # under the limit: untouched

    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = dict(teacher.named_parameters())["aggregator.gate_alpha"].clone()
    ema_update(teacher, model, 0.9)
    torch.testing.assert_close(
        teacher.aggregator.gate_alpha, 0.9 * before + 0.1 * model.aggregator.gate_alpha
    )
    assert not torch.equal(teacher.backbone.blocks[0].mlp.fc1.weight, frozen)  # frozen: not averaged


def test_training_step_trains_the_student_lora_and_moves_the_teacher_by_ema() -> None:
    student = tiny_mile(head_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, norm_last_layer=False)
    ssl = MILESelfSupervised(student, DINOLoss(32, ncrops=4, epochs=2))
    assert ssl.teacher.backbone is not ssl.student.backbone  # upstream shares (and freezes) one ViT
    optimizer = torch.optim.AdamW(ssl.param_groups())
    schedules = DINOSchedules.create(epochs=2, iters_per_epoch=2, lr=1e-2, min_lr=1e-3, warmup_epochs=0)
    g = torch.Generator().manual_seed(0)
    batch = MultiCropSetBatch(
        torch.randn(2, 3, 2, 3, 28, 28, generator=g),
        torch.randn(2, 3, 2, 3, 14, 14, generator=g),
        torch.tensor([[False, False, True], [False, False, False]]),
    )
    lora = "backbone.blocks.0.attn.qkv.lora_A.default.weight"
    last = "head.last_layer.parametrizations.weight.original1"
    frozen = "backbone.blocks.0.mlp.fc1.weight"
    start = {k: v.clone() for k, v in student.state_dict().items()}
    stats = ssl.training_step(batch, optimizer, schedules, epoch=0, iteration=0)
    assert stats.lr == schedules.lr[0] and stats.momentum == schedules.momentum[0]
    after = student.state_dict()
    assert not torch.equal(after[lora], start[lora])  # LoRA trains
    assert torch.equal(after[last], start[last])  # last layer frozen during epoch 0
    assert torch.equal(after[frozen], start[frozen])
    assert ssl.teacher.training is False and all(not p.requires_grad for p in ssl.teacher.parameters())
    m = stats.momentum
    torch.testing.assert_close(ssl.teacher.state_dict()[lora], m * start[lora] + (1 - m) * after[lora])
    ssl.training_step(batch, optimizer, schedules, epoch=1, iteration=2)
    assert not torch.equal(student.state_dict()[last], start[last])  # epoch 1: the last layer learns
    assert optimizer.param_groups[0]["weight_decay"] == schedules.weight_decay[2]

    with pytest.raises(ValueError, match="ncrops=4"):
        ssl(MultiCropSetBatch(batch.global_crops), epoch=0)
    with pytest.raises(ValueError, match=r"global_crops must be \(B, K, G, 3, H, W\)"):
        ssl(MultiCropSetBatch(torch.randn(2, 3, 28, 28)), epoch=0)
    with pytest.raises(ValueError, match="needs a DINO head"):
        MILESelfSupervised(tiny_mile(), DINOLoss(32, ncrops=4))
    bad_local = batch.local_crops.clone()
    bad_local[1, 0, 1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"local_crops contains NaN or inf values \(first at row 1\)"):
        ssl(MultiCropSetBatch(batch.global_crops, bad_local, batch.mask), epoch=0)
    bad_global = batch.global_crops.clone()
    bad_global[0, 2] = float("nan")  # image 2 of object 0 is padding: ignored
    ssl(MultiCropSetBatch(bad_global, batch.local_crops, batch.mask), epoch=0)
    empty = torch.tensor([[False, False, False], [True, True, True]])
    with pytest.raises(ValueError, match="mask: object 1 is entirely padding"):
        ssl(MultiCropSetBatch(batch.global_crops, batch.local_crops, empty), epoch=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_set_embeddings_and_training_step(dtype: torch.dtype) -> None:
    model = tiny_mile()
    images = torch.randn(2, 3, 3, 28, 28)
    with torch.no_grad():
        expected = model(images)
        gpu = copy.deepcopy(model).cuda()
        with torch.autocast("cuda", dtype=dtype):
            actual = gpu(images.cuda()).float().cpu()
    torch.testing.assert_close(actual, expected, rtol=5e-2, atol=5e-2)

    student = tiny_mile(head_dim=32, head_hidden_dim=16, head_bottleneck_dim=8).cuda()
    ssl = MILESelfSupervised(student, DINOLoss(32, ncrops=4, epochs=1).cuda())
    optimizer = torch.optim.AdamW(ssl.param_groups())
    schedules = DINOSchedules.create(epochs=1, iters_per_epoch=1, lr=1e-3, warmup_epochs=0)
    batch = MultiCropSetBatch(torch.randn(2, 3, 2, 3, 28, 28).cuda(), torch.randn(2, 3, 2, 3, 14, 14).cuda())
    stats = ssl.training_step(batch, optimizer, schedules, epoch=0, iteration=0, amp_dtype=dtype)
    assert torch.isfinite(torch.tensor(stats.loss))
