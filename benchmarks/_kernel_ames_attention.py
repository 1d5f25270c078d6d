"""AMES rerank throughput with FlexAttention (``attention="flex"``) against the dense-mask path (``"dense"``).

The same model (the released dinov2_ames architecture: 5 layers, width 128, 2 heads, random weights) scores
batches of (query, database) pairs from projected tokens, as :class:`AMESScorer` does in reranking: 600 query
and 50 database descriptors per image as in the specs, a quarter of the queries and of the database images
padded (400 and 40 real descriptors). Reported per dtype (float32; bfloat16 autocast on CUDA) and batch of
pairs: pairs/s of each path, the speed-up (dense time / flex time; the issue's target is 2) and the largest
logit difference. The first flex call on CUDA compiles the kernel; it is a warm-up, never timed.

- CUDA: batches of 100 and 1,000 pairs (100 with ``quick``), FlexAttention compiled to Triton;
- CPU: a 2-layer model on 64 query / 16 database tokens, 8 pairs, eager FlexAttention (which materialises
  the scores: slower than dense there; it only proves the script and the agreement of the two paths).

The official implementation is not part of this repository and no copy is stored on the GPU machine: it is
skipped here; ``benchmarks/bench_ames.py --official <checkout of pavelsuma/ames>`` times it against ours.

    cd benchmarks && uv run python -c "import _kernel_ames_attention as b; print(b.bench('cpu', True))"

Returns ``ames_flex_speedup`` (bfloat16 on CUDA, float32 on the CPU, at the largest batch), and per setting
``ames_flex_speedup_<dtype>_b<batch>``, ``ames_dense_pairs_per_s_<dtype>_b<batch>``,
``ames_flex_pairs_per_s_<dtype>_b<batch>``, ``ames_flex_max_abs_diff_<dtype>_b<batch>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from _harness import timed

from objretrieval import create_model
from objretrieval.models import AMES
from objretrieval.models.ames import ProjectedDescriptors

QUERY_TOKENS, DATABASE_TOKENS = 600, 50


def _pairs(model: AMES, batch: int, q: int, t: int, device: torch.device) -> tuple[ProjectedDescriptors, ...]:
    """Projected query and database tokens of ``batch`` pairs; every fourth image padded to 2/3 and 4/5."""
    g = torch.Generator().manual_seed(0)
    src, tgt = (
        torch.randn(batch, q, model.local_dim, generator=g),
        torch.randn(batch, t, model.local_dim, generator=g),
    )
    src_pad, tgt_pad = torch.zeros(batch, q, dtype=torch.bool), torch.zeros(batch, t, dtype=torch.bool)
    src_pad[::4, (2 * q) // 3 :] = True
    tgt_pad[1::4, (4 * t) // 5 :] = True
    with torch.no_grad():
        return (
            model.project_query(src.to(device), src_pad.to(device)),
            model.project_database(tgt.to(device), tgt_pad.to(device)),
        )


def _scoring(
    model: AMES, pairs: tuple, amp: torch.dtype | None, device: torch.device
) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return model.score(*pairs).float().cpu()  # the copy synchronises

    return run


def bench(device: str, quick: bool) -> dict[str, float]:
    """Pairs/s of the flex and dense AMES paths; see the module docstring."""
    dev = torch.device(device)
    if dev.type == "cuda":
        model = create_model("dinov2_ames").to(dev).eval()
        q, t, batches = QUERY_TOKENS, DATABASE_TOKENS, [100] if quick else [100, 1000]
        dtypes: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
    else:
        model = create_model("dinov2_ames", num_encoder_layers=2).eval()
        q, t, batches, dtypes = 64, 16, [8], {"fp32": None}
    budget = 1.0 if quick else 3.0
    print(
        f"AMES rerank scoring, {q} query / {t} database tokens, {len(model.decoder.layers)} layers, {dev}"
        f"{' (eager FlexAttention)' if dev.type != 'cuda' else ''}"
    )
    print(
        f"  {'dtype':<5} {'pairs':>6} {'dense pairs/s':>14} {'flex pairs/s':>13} {'speed-up':>9} {'max |diff|':>11}"
    )
    result: dict[str, float] = {}
    for batch in batches:
        pairs = _pairs(model, batch, q, t, dev)
        for tag, amp in dtypes.items():
            model.set_attention("dense")
            dense_out, dense_s, _ = timed(_scoring(model, pairs, amp, dev), dev, budget_s=budget, max_runs=5)
            model.set_attention("flex")
            flex_out, flex_s, _ = timed(_scoring(model, pairs, amp, dev), dev, budget_s=budget, max_runs=5)
            diff = (flex_out - dense_out).abs().max().item()
            key = f"{tag}_b{batch}"
            result.update(
                {
                    f"ames_flex_speedup_{key}": dense_s / flex_s,
                    f"ames_dense_pairs_per_s_{key}": batch / dense_s,
                    f"ames_flex_pairs_per_s_{key}": batch / flex_s,
                    f"ames_flex_max_abs_diff_{key}": diff,
                }
            )
            print(
                f"  {tag:<5} {batch:>6} {batch / dense_s:>14,.0f} {batch / flex_s:>13,.0f} "
                f"{dense_s / flex_s:>9.2f} {diff:>11.1e}"
            )
    model.set_attention("dense")
    headline = f"{'bf16' if dev.type == 'cuda' else 'fp32'}_b{batches[-1]}"
    result["ames_flex_speedup"] = result[f"ames_flex_speedup_{headline}"]
    print("  official implementation: skipped (no copy here; bench_ames.py --official <checkout> times it)")
    return result
