"""MILE's self-supervised step under DistributedDataParallel, in real gloo processes (no mocked collectives).

Each rank trains on its shard of a global batch (uneven shards, padded sets) for two steps; the student, the
EMA teacher and the DINO centre must then equal two steps of one process on the concatenated batches. In
float64 the only differences left are summation orders (per-rank partial sums of the gradients and the centre
instead of one sum over the batch): measured 5e-15 at most for values of order one, checked to 1e-12. With
the per-rank mean loss that DDP would average unscaled, the gradients differ by 0.06 here.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from objretrieval import create_model
from objretrieval.losses.dino import DINOLoss
from objretrieval.models.mile import MILE
from objretrieval.training.mile import MILESelfSupervised, MultiCropSetBatch
from objretrieval.training.schedules import DINOSchedules
from tests.spawn import run_world

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 56}
OUT_DIM, N_GLOBAL, N_LOCAL, IMAGES = 32, 2, 2, 3
STEPS = ((0, 0), (1, 1))  # (epoch, iteration): the head's last layer is frozen in epoch 0 only
TOL = {"rtol": 1e-12, "atol": 1e-12}


def build(seed: int) -> MILESelfSupervised:
    """A float64 MILE with LoRA (no dropout: ranks and the reference must draw nothing at random)."""
    torch.manual_seed(seed)
    student = create_model(
        "mile_vits",
        backbone_kwargs=TINY,
        lora_r=4,
        lora_dropout=0.0,
        head_dim=OUT_DIM,
        head_hidden_dim=16,
        head_bottleneck_dim=8,
        norm_last_layer=False,
    )
    assert isinstance(student, MILE)
    with torch.no_grad():  # PEFT zero-initialises lora_B and the gate starts at 0: make both matter
        for name, p in student.named_parameters():
            if "lora_B" in name or name.endswith("gate_alpha"):
                p.normal_(0, 0.3)
    ssl = MILESelfSupervised(student, DINOLoss(OUT_DIM, ncrops=N_GLOBAL + N_LOCAL, epochs=2)).double()
    ssl.loss.center.normal_(0, 0.1)  # a resumed, non-zero centre, so that the broadcast of it matters
    return ssl


def batches(n_objects: int) -> list[MultiCropSetBatch]:
    """One global batch per step, with padded images (object 1 has one image, object 3 two)."""
    g = torch.Generator().manual_seed(n_objects)
    mask = torch.zeros(n_objects, IMAGES, dtype=torch.bool)
    mask[1, :2] = True
    mask[3 % n_objects, 2] = True
    return [
        MultiCropSetBatch(
            torch.randn(n_objects, IMAGES, N_GLOBAL, 3, 28, 28, generator=g, dtype=torch.float64),
            torch.randn(n_objects, IMAGES, N_LOCAL, 3, 14, 14, generator=g, dtype=torch.float64),
            mask,
        )
        for _ in STEPS
    ]


def shard(batch: MultiCropSetBatch, start: int, stop: int) -> MultiCropSetBatch:
    assert batch.local_crops is not None and batch.mask is not None
    return MultiCropSetBatch(
        batch.global_crops[start:stop], batch.local_crops[start:stop], batch.mask[start:stop]
    )


def trainable(ssl: MILESelfSupervised) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in ssl.student.named_parameters() if p.requires_grad}


def train(ssl: MILESelfSupervised, steps: list[MultiCropSetBatch]) -> dict:
    """Two training steps; the (clipped) gradients of each step, then the final states."""
    optimizer = torch.optim.AdamW(ssl.param_groups())
    schedules = DINOSchedules.create(epochs=2, iters_per_epoch=1, lr=1e-2, min_lr=1e-3, warmup_epochs=0)
    losses, grads = [], []
    for batch, (epoch, iteration) in zip(steps, STEPS, strict=True):
        losses.append(ssl.training_step(batch, optimizer, schedules, epoch=epoch, iteration=iteration).loss)
        # Adam's first update is about lr * sign(grad), blind to how the ranks' gradients are weighted:
        # the gradients themselves are compared too
        grads.append({n: p.grad.clone() for n, p in trainable(ssl).items() if p.grad is not None})
    return {
        "losses": losses,
        "grads": grads,
        "student": {n: p.detach().clone() for n, p in trainable(ssl).items()},
        "teacher": {k: v.clone() for k, v in ssl.teacher.state_dict().items()},
        "center": ssl.loss.center.clone(),
    }


def ranks_train(rank: int, world: int, sizes: list[int]) -> dict:
    ssl = build(seed=rank)  # differently seeded on each rank: ddp_student must make rank 0's the common start
    subgroup = dist.new_group([0])  # collective: every rank creates it
    with pytest.raises(
        ValueError, match="process_group: DINOLoss averages its centre over the default group"
    ):
        ssl.ddp_student(process_group=subgroup)  # a failed check here fails the rank, and so the test
    ddp = ssl.ddp_student()
    with pytest.raises(RuntimeError, match="already wrapped"):
        ssl.ddp_student()
    start = sum(sizes[:rank])
    result = train(ssl, [shard(b, start, start + sizes[rank]) for b in batches(sum(sizes))])
    # what DDP reduces: the parameters of its module that require a gradient
    wrapped = {id(p): p.requires_grad for p in ddp.module.parameters()}
    reduced = {i for i, requires_grad in wrapped.items() if requires_grad}
    result["reducer_is_student_trainable"] = reduced == {id(p) for p in trainable(ssl).values()}
    result["teacher_in_ddp"] = any(id(p) in wrapped for p in ssl.teacher.parameters())
    return result


def test_ddp_step_equals_one_process_on_the_concatenated_batch() -> None:
    # 2 ranks, uneven shards (3 + 2 objects). Every spawned rank imports peft (about 8 s of CPU), so 3 ranks
    # (1 + 3 + 1 objects: they pass too) would cost as much again for no new code path
    sizes = [3, 2]
    ranks = run_world(ranks_train, len(sizes), sizes)
    reference = train(build(seed=0), batches(sum(sizes)))
    names = reference["student"].keys()
    # LoRA and the qkv biases train ("lora_only"); the ViT's weights stay frozen, out of the reducer
    assert any("lora_A" in n for n in names) and any(n.endswith("qkv.base_layer.bias") for n in names)
    assert not any(n.endswith(("base_layer.weight", "fc1.weight", "patch_embed.proj.weight")) for n in names)
    assert not any("last_layer" in n for n in reference["grads"][0])  # frozen in epoch 0 ...
    assert any("last_layer" in n for n in reference["grads"][1])  # ... and trained in epoch 1
    for r, result in enumerate(ranks):
        assert result["reducer_is_student_trainable"] and not result["teacher_in_ddp"], r
        # the reported loss is the global batch's, on every rank
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), **TOL)
        torch.testing.assert_close(result["center"], reference["center"], **TOL)
        compared = [(f"step {i} grad", result["grads"][i], reference["grads"][i]) for i in range(len(STEPS))]
        compared += [(what, result[what], reference[what]) for what in ("student", "teacher")]
        for what, actual, expected in compared:
            assert actual.keys() == expected.keys(), what
            for name, value in expected.items():
                torch.testing.assert_close(actual[name], value, **TOL, msg=f"rank {r} {what} {name}")
        for what in ("student", "teacher"):  # every rank holds the very same models
            assert all(torch.equal(v, ranks[0][what][k]) for k, v in result[what].items()), (r, what)


def test_ddp_student_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        build(seed=0).ddp_student()
