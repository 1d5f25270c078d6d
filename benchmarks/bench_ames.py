"""AMES reranking throughput: objretrieval vs the official implementation, same weights and descriptors.

Random weights (identical in both models), queries of 600 and database images of 50 local descriptors
(768-d, some padded), a top-100 shortlist per query. The official side runs its ``rerank`` loop: one
forward per shortlist rank over the batch of queries. Ours projects each query once, the database once (a
float16 cache, or packed codes for the binarized model) and scores each query's candidates in batches.
Reports query-candidate pairs per second (float32, and bfloat16 / float16 autocast), peak memory, the share
of shortlist positions where the ranking by AMES score equals the official one, and the memory one database
image takes in each form.

The official code is not part of this repository: point --official at a checkout of github.com/pavelsuma/ames
(its ``src/models`` is imported).

    uv run python benchmarks/bench_ames.py --official /path/to/ames
    uv run python benchmarks/bench_ames.py --official /path/to/ames --device cuda --queries 300
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _harness import timed

from objretrieval import create_model
from objretrieval.reranking import AMESScorer, DatabaseCache, Shortlist, rerank, score_shortlist

LOCAL_DIM, QUERY_DESCRIPTORS, DATABASE_DESCRIPTORS, TOP_K = 768, 600, 50, 100


def official_model(
    checkout: Path, ours: torch.nn.Module, binarized: bool, device: torch.device
) -> torch.nn.Module:
    sys.path.insert(0, str(checkout / "src"))
    matcher = importlib.import_module("models.matcher")
    data_root = tempfile.mkdtemp()
    if binarized:  # the official constructor insists on reading an ITQ file, which the checkpoint overwrites
        (Path(data_root) / "networks").mkdir()
        np.savez(
            Path(data_root) / "networks" / "itq_dinov2_D128.npz", proj=np.zeros((LOCAL_DIM, 128), np.float32)
        )
    model = matcher.AMES(data_root, LOCAL_DIM, 128, 2, 5, 1024, "relu", False, binarized=binarized)
    model.load_state_dict(ours.state_dict(), strict=True)
    return model.to(device).eval()


def make_data(queries: int, database: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(queries, QUERY_DESCRIPTORS, LOCAL_DIM, generator=g)
    q_pad = torch.zeros(queries, QUERY_DESCRIPTORS, dtype=torch.bool)
    q_pad[:, torch.randint(400, QUERY_DESCRIPTORS, (1,), generator=g) :] = True
    d = torch.randn(database, DATABASE_DESCRIPTORS, LOCAL_DIM, generator=g)
    d_pad = torch.zeros(database, DATABASE_DESCRIPTORS, dtype=torch.bool)
    d_pad[::4, 40:] = True
    ids = torch.stack([torch.randperm(database, generator=g)[:TOP_K] for _ in range(queries)])
    sims = torch.rand(queries, TOP_K, generator=g).sort(dim=1, descending=True).values
    return q, q_pad, d, d_pad, Shortlist(sims, ids)


@torch.no_grad()
def official_raw(
    model: torch.nn.Module,
    q: torch.Tensor,
    q_pad: torch.Tensor,
    d: torch.Tensor,
    d_pad: torch.Tensor,
    shortlist: Shortlist,
    device: torch.device,
) -> torch.Tensor:
    """The official ``rerank`` loop: one forward per shortlist rank, all queries of the batch at once."""
    q, q_pad = q.to(device), q_pad.to(device)
    columns = []
    for r in range(TOP_K):
        ids = shortlist.indices[:, r]
        columns.append(model(q, q_pad, d[ids].to(device), d_pad[ids].to(device)).float().cpu())
    return torch.stack(columns, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/pavelsuma/ames")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--database", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16, help="candidates per call (ours)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    q, q_pad, d, d_pad, shortlist = make_data(args.queries, args.database, seed=1)
    pairs = args.queries * TOP_K
    print(
        f"{args.queries} queries x top-{TOP_K} = {pairs} pairs, {QUERY_DESCRIPTORS}/{DATABASE_DESCRIPTORS} "
        f"descriptors of {LOCAL_DIM}-d, {device}, {torch.get_num_threads()} threads\n"
    )

    results = {}
    for name in ("dinov2_ames", "dinov2_ames_dist"):
        ours = (
            create_model(name).to(device).eval()
        )  # the official initialisation, shared with the official model
        official = official_model(args.official, ours, ours.binarized, device)
        theirs, official_s, official_mib = timed(
            lambda official=official: official_raw(official, q, q_pad, d, d_pad, shortlist, device),
            device,
            budget_s=0.0,
            max_runs=1,
        )

        start = time.perf_counter()
        cache = DatabaseCache.build(ours, (d, d_pad), max_descriptors=DATABASE_DESCRIPTORS, device=device)
        cache_s = time.perf_counter() - start
        # rankings by the AMES scores alone (lamb = 0): the strictest comparison, the global scores cannot hide
        # a difference
        reference = rerank(shortlist, theirs, TOP_K, 0.0, 1.0)
        variants = [("float32", False, torch.float16), ("bfloat16 autocast", True, torch.bfloat16)]
        if device.type == "cuda":
            variants.insert(1, ("float16 autocast", True, torch.float16))
        for label, autocast, amp_dtype in variants:
            scorer = AMESScorer(
                ours, (q, q_pad), cache, batch_size=args.batch_size, device=device, autocast=autocast,
                amp_dtype=amp_dtype,
            )  # fmt: skip
            mine, ours_s, ours_mib = timed(
                lambda scorer=scorer: score_shortlist(scorer, shortlist, TOP_K), device
            )
            ranking = rerank(shortlist, mine, TOP_K, 0.0, 1.0)
            same = (ranking == reference).float().mean().item()
            if label == "float32":
                results[name] = (
                    official_s / ours_s,
                    cache.bytes_per_image,
                    same == 1.0,
                    ours_mib / max(official_mib, 1e-9),
                )
                print(
                    f"{name}: official {pairs / official_s:,.1f} pairs/s ({official_mib:,.0f} MiB peak), "
                    f"database projected once in {cache_s:.2f} s ({args.database} images)"
                )
            print(
                f"  ours {label}: {pairs / ours_s:,.1f} pairs/s ({official_s / ours_s:.2f}x, {ours_mib:,.0f} MiB "
                f"peak); max |raw diff| {(mine - theirs).abs().max():.1e}; rank positions identical: {100 * same:.1f}%"
            )

    print("\nmemory per database image (50 descriptors):")
    print(
        f"  official descriptor rows, float32 (773 columns): {DATABASE_DESCRIPTORS * (5 + LOCAL_DIM) * 4:,} B"
    )
    print(f"  projected tokens, float32:                       {DATABASE_DESCRIPTORS * 128 * 4:,} B")
    print(f"  projected tokens, float16 (our cache):           {results['dinov2_ames'][1]:,} B")
    print(f"  packed binary codes (our cache):                 {results['dinov2_ames_dist'][1]:,} B")
    identical = all(r[2] for r in results.values())
    print(f"float32 rankings by AMES score identical to the official ones, both models: {identical}")
    # memory_ratio is ours / reference in every benchmark (peak memory of the float32 full-precision scoring)
    print(
        f"RESULT speedup={results['dinov2_ames'][0]:.2f} memory_ratio={results['dinov2_ames'][3]:.2f} "
        f"bytes_per_image_binary={results['dinov2_ames_dist'][1]}"
    )


if __name__ == "__main__":
    main()
