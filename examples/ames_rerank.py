"""AMES reranking end to end, on a small synthetic landmark dataset the example makes itself.

1. Draws a few synthetic "landmarks" and photographs each several times (easy, hard and junk views), plus
   distractors; queries are further views with a bounding box, as in revisited Oxford/Paris.
2. Extracts DINOv2 local descriptors (ViT-B/14 with registers through timm; randomly initialised unless
   ``--pretrained-backbone``) and writes them to descriptor files in AMES's layout (``features`` (N, 700, 5 + D)).
3. Shortlists each query's nearest database images by global descriptor (exact kNN).
4. Reranks the shortlist with AMES (random weights unless ``--checkpoint`` gives the released ones), with the
   database projected once (packed 128-bit codes for the ``*_dist`` models, written to a code file),
   fusing ``lamb * global + (1 - lamb) * sigmoid(temp * logit)``.
5. Prints revisited Medium / Hard mAP: global only, the model's default fusion, and the best of a small sweep.

With random AMES weights (no ``--checkpoint``) the pairwise scores carry no matching signal, so reranking cannot
be expected to beat the global shortlist; the script says so in its output, and its numbers only show that the
pipeline runs. With the released DINOv2 and AMES weights the same script reranks real descriptors.

Run:  uv run examples/ames_rerank.py [--model dinov2_ames_dist] [--checkpoint dinov2_ames.pt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from scenes import draw_scene, photograph

from objretrieval import create_model, knn
from objretrieval.descriptors import DescriptorStore, DINOv2LocalExtractor, extract_to_store
from objretrieval.metrics import revisited_map
from objretrieval.reranking import AMES_FUSION, AMESScorer, DatabaseCache, rerank_revisited

RANDOM_WEIGHTS_NOTE = (
    "note: the AMES weights are random (no --checkpoint), so its scores carry no matching signal and reranking "
    "cannot be expected to beat the global shortlist; the AMES rows only show that the pipeline runs. Pass "
    "--checkpoint with the released weights (and --pretrained-backbone) for a real reranking."
)


def make_dataset(
    landmarks: int, distractors: int, seed: int, size: tuple[int, int]
) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]], list[torch.Tensor], list[dict]]:
    """Query images with boxes, database images, and revisited-style ground truth (easy / hard / junk ids)."""
    height, width = size
    g = torch.Generator().manual_seed(seed)
    scenes = [draw_scene(g, height, width) for _ in range(landmarks)]
    database: list[torch.Tensor] = []
    gnd = []
    for scene in scenes:
        ids = {"easy": [], "hard": [], "junk": []}
        for kind, strength in (("easy", 0.3), ("easy", 0.5), ("hard", 1.0), ("junk", 1.0)):
            view = photograph(scene, g, strength)
            if kind == "junk":  # most of the landmark hidden behind a distractor
                view[:, :, : width * 3 // 4] = draw_scene(g, height, width)[:, :, : width * 3 // 4]
            ids[kind].append(len(database))
            database.append(view)
        gnd.append(ids)
    database += [draw_scene(g, height, width) for _ in range(distractors)]
    queries = [photograph(scene, g, 0.2) for scene in scenes]
    boxes = [
        (width // 14, height // 14, width - width // 14, height - height // 14)
    ] * landmarks  # x1, y1, x2, y2
    return queries, boxes, database, gnd


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="dinov2_ames", choices=sorted(AMES_FUSION))
    parser.add_argument("--checkpoint", help="AMES weights (official {'state': ...} file or ours)")
    parser.add_argument("--backbone", default="vit_base_patch14_reg4_dinov2", help="a timm DINOv2 ViT")
    parser.add_argument(
        "--pretrained-backbone", action="store_true", help="timm's DINOv2 weights (downloads)"
    )
    parser.add_argument("--landmarks", type=int, default=6)
    parser.add_argument("--distractors", type=int, default=8)
    parser.add_argument("--topk", type=int, default=700, help="descriptors stored per image")
    parser.add_argument("--query-descriptors", type=int, default=600)
    parser.add_argument("--db-descriptors", type=int, default=50)
    parser.add_argument("--shortlist", type=int, default=100, help="global kNN shortlist length")
    parser.add_argument("--out", type=Path, default=Path("ames_rerank_out"))
    parser.add_argument("--image-size", type=int, nargs=2, default=(224, 294), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    queries, boxes, database, gnd = make_dataset(
        args.landmarks, args.distractors, args.seed, tuple(args.image_size)
    )
    print(f"{len(queries)} queries, {len(database)} database images")
    extractor = DINOv2LocalExtractor(args.backbone, pretrained=args.pretrained_backbone, topk=args.topk)
    start = time.perf_counter()
    q_global = extract_to_store(extractor, queries, args.out / "query_local.h5", boxes=boxes, progress=True)
    db_global = extract_to_store(extractor, database, args.out / "db_local.h5", progress=True)
    print(f"extracted {len(queries) + len(database)} images in {time.perf_counter() - start:.1f} s")

    shortlist = knn(q_global, db_global, k=min(args.shortlist, len(database)))  # Neighbors are a shortlist
    baseline = revisited_map(shortlist.indices, gnd)

    dim = extractor.backbone.num_features
    model = create_model(
        args.model, checkpoint=args.checkpoint, **({} if args.checkpoint else {"local_dim": dim})
    )
    with (
        DescriptorStore(args.out / "query_local.h5") as q_store,
        DescriptorStore(args.out / "db_local.h5") as db,
    ):
        cache = DatabaseCache.build(model, db, max_descriptors=args.db_descriptors)
        if model.binarized:
            cache.save_codes(args.out / "db_codes.h5")
        print(
            f"database cache: {cache.bytes_per_image} bytes per image ({'packed codes' if model.binarized else 'fp16'})"
        )
        scorer = AMESScorer(model, q_store, cache, query_descriptors=args.query_descriptors)
        lamb, temp = model.fusion  # the authors' values for this model
        start = time.perf_counter()
        result = rerank_revisited(
            scorer,
            shortlist,
            gnd,
            top_k=(shortlist.indices.shape[1],),
            lamb=sorted({lamb, 0.25, 0.5, 0.75}),
            temp=sorted({temp, 0.1, 0.5, 1.0}),
        )
        pairs = 2 * shortlist.indices.numel()  # the medium and the hard runs
        print(f"reranked {pairs} pairs in {time.perf_counter() - start:.1f} s")
    default = next(c for c in result.combinations if (c.lamb, c.temp) == (lamb, temp))
    best = result.best
    print(f"{'':<34} {'M mAP':>7} {'H mAP':>7}")
    print(f"{'global only':<34} {100 * baseline.medium.map:>7.2f} {100 * baseline.hard.map:>7.2f}")
    label = f"AMES default lamb={lamb} temp={temp}"
    print(f"{label:<34} {100 * default.medium_map:>7.2f} {100 * default.hard_map:>7.2f}")
    label = f"AMES best lamb={best.lamb} temp={best.temp}"
    print(f"{label:<34} {100 * best.medium_map:>7.2f} {100 * best.hard_map:>7.2f}")
    if args.checkpoint is None:
        print(RANDOM_WEIGHTS_NOTE)


if __name__ == "__main__":
    main()
