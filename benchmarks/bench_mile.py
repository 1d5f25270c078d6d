"""MILE set embeddings: incremental updates vs recomputation, and objretrieval vs the official model.

One object with 16 images (224 px), a DINOv2-style ViT with registers and LoRA (ViT-S/14 by default on
CPU; ``--vit large`` for ViT-L on a GPU), random weights identical in both implementations.

1. Per-step embeddings (the set embedding after each new image, as an online index needs them):
   - ours incremental: ``model.update`` per image, one backbone pass and one aggregator step each;
   - recomputation: the set embedding of every prefix from scratch (what the official model offers, whose
     forward takes the whole list of images every time).
2. One embedding of the full 16-image set: ours (the images batched through the backbone) vs the official
   ``MILE`` forward (one backbone call per image, as its inference loop feeds them), in float32; and ours
   with the LoRA merged into qkv and bfloat16 autocast. In float32 on a CPU both run at the matmul floor
   (about 12 GFLOP per ViT-S image), so the ratio there is about 1.

The official code is not part of this repository: ``--official`` points at a folder holding the official
``dino/utils.py`` of amazon-science/MILE at commit 41d6c74^ (where ``MILE`` and ``CrossAttentionBlock`` still
exist), and facebookresearch/dinov2's ``dinov2/`` package:

    uv run python benchmarks/bench_mile.py --official /tmp/official_mile
    uv run python benchmarks/bench_mile.py --official /tmp/official_mile --device cuda --vit large --amp bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import sys
from pathlib import Path

import torch
from _harness import timed

from objretrieval import create_model
from objretrieval.models import MILE, convert_official_mile

VITS = {
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def official_model(checkout: Path, vit: dict[str, int]) -> torch.nn.Module:
    """The official inference model (``init_model(view="multi-view", peft=on)``) around a random DINOv2 ViT."""
    import peft

    sys.path.insert(0, str(checkout))
    utils = importlib.import_module("dino.utils")
    vt = importlib.import_module("dinov2.models.vision_transformer")
    with contextlib.redirect_stdout(None):  # the official modules print while building
        backbone = vt.DinoVisionTransformer(
            img_size=518,
            patch_size=14,
            mlp_ratio=4,
            init_values=1.0,
            num_register_tokens=4,
            interpolate_antialias=True,
            interpolate_offset=0.0,
            block_chunks=0,
            **vit,
        )
        config = peft.LoraConfig(
            r=48, lora_alpha=16, target_modules=["qkv"], lora_dropout=0.1, bias="lora_only"
        )
        backbone = peft.get_peft_model(backbone, config)
        dim = vit["embed_dim"]
        model = utils.MILE(
            backbone=utils.MultiCropWrapper(backbone, None),
            latent_cross=utils.CrossAttentionBlock(dim=dim, proj_dim=2 * dim, num_heads=1),
            dual_latent_cross=None,
            num_global_crops=2,
            num_local_crops=8,
            gate_tanh=True,
        )
    with torch.no_grad():  # LoRA B is zero at init; make the adapters and the gate matter
        for name, p in model.named_parameters():
            if "lora_B" in name or name == "gate_alpha":
                p.normal_(0, 0.05)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--official", type=Path, required=True, help="folder with dino/utils.py and dinov2/")
    parser.add_argument("--vit", choices=sorted(VITS), default="small")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast ours on --device")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vit = VITS[args.vit]
    torch.manual_seed(0)

    official = official_model(args.official, vit).to(device)
    ours = create_model(
        "mile_vitl",
        checkpoint=convert_official_mile(official.state_dict(), keep_head=False),
        backbone_kwargs=vit,
    )
    assert isinstance(ours, MILE)
    ours = ours.to(device).eval()
    n = args.images
    images = torch.randn(1, n, 3, args.size, args.size, device=device)
    as_list = [
        images[:, t] for t in range(n)
    ]  # what the official DataLoader yields: one (1, 3, H, W) per image
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp or "")

    def autocast() -> contextlib.AbstractContextManager:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp)

    @torch.no_grad()
    def ours_incremental() -> torch.Tensor:
        latent, steps = None, []
        with autocast():
            for t in range(n):
                latent = ours.update(latent, images[:, t])
                steps.append(latent.float())
        return torch.cat(steps)

    @torch.no_grad()
    def official_recompute() -> torch.Tensor:
        return torch.cat([official(as_list[: t + 1], output_type="latent") for t in range(n)])

    @torch.no_grad()
    def ours_set() -> torch.Tensor:
        with autocast():
            return ours(images).float()

    merged = copy.deepcopy(ours).merge_lora()

    @torch.no_grad()
    def ours_set_bf16() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return merged(images).float()

    @torch.no_grad()
    def official_set() -> torch.Tensor:
        return official(as_list, output_type="latent")

    print(f"MILE on a random ViT-{args.vit[0].upper()}/14 + LoRA, {n} images of {args.size} px, {device}")
    print(f"{'':34s} {'seconds':>9s} {'images/s':>9s} {'peak MiB':>9s}")
    rows = {}
    budget = 3.0 if device.type == "cuda" else 1.0
    for name, fn, count in (
        ("per-step, ours incremental", ours_incremental, n),
        ("per-step, official recomputation", official_recompute, n),
        ("one set, ours (batched)", ours_set, n),
        ("one set, ours merged LoRA + bf16", ours_set_bf16, n),
        ("one set, official", official_set, n),
    ):
        out, seconds, peak = timed(fn, device, budget_s=budget, max_runs=3)
        rows[name] = (out, seconds)
        print(f"{name:34s} {seconds:9.3f} {count / seconds:9.1f} {peak:9.0f}")

    steps_ours, steps_official = (
        rows["per-step, ours incremental"][0],
        rows["per-step, official recomputation"][0],
    )
    set_ours, set_official = rows["one set, ours (batched)"][0], rows["one set, official"][0]
    print(
        f"max |ours - official|: per-step {float((steps_ours - steps_official).abs().max()):.2e}, "
        f"set {float((set_ours - set_official).abs().max()):.2e}"
    )
    incremental = rows["per-step, official recomputation"][1] / rows["per-step, ours incremental"][1]
    vs_official = rows["one set, official"][1] / rows["one set, ours (batched)"][1]
    vs_bf16 = rows["one set, official"][1] / rows["one set, ours merged LoRA + bf16"][1]
    bf16_error = float((rows["one set, ours merged LoRA + bf16"][0] - set_official).abs().max())
    print(f"merged LoRA + bf16 autocast: {vs_bf16:.2f}x the official speed, max |diff| {bf16_error:.2e}")
    print(f"RESULT incremental_speedup={incremental:.2f} vs_official={vs_official:.2f}")


if __name__ == "__main__":
    main()
