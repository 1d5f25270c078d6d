"""Reproduce AMES on revisited Oxford/Paris from the authors' released descriptor files.

Expects the official data layout (the authors' ``data`` folder, e.g. fetched with the ``wget`` command of
github.com/pavelsuma/ames):

    {data_root}/{dataset}/{desc}_query_local.hdf5     features (Q, 700, 5 + D)
    {data_root}/{dataset}/{desc}_gallery_local.hdf5   features (N, 700, 5 + D)
    {data_root}/{dataset}/nn_superglobal.pkl          the global shortlist, (2, Q, K): similarities, ids
    {data_root}/{dataset}/gnd_{dataset}.pkl           the ground truth, {'gnd': [{'easy', 'hard', 'junk'}, ...]}

The published results (mAP, Medium / Hard, reranking the top 100 of a SuperGlobal shortlist):

    model               ROxford        RParis
    dinov2_ames         92.7 / 83.7    95.2 / 90.6
    dinov2_ames_dist    91.1 / 82.2    95.2 / 90.2
    cvnet_ames          89.2 / 78.7    93.4 / 86.8
    cvnet_ames_dist     88.8 / 77.5    93.2 / 86.3

Run:  uv run examples/ames_revisited.py --data-root data --dataset roxford5k --model dinov2_ames
      (add --checkpoint networks/dinov2_ames.pt for a local copy of the weights, --device cuda for a GPU,
      --lamb / --temp / --top-k with several values for a sweep)

The pickles are read with Python's pickle, as the official code does: only use files you trust.
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import torch

from objretrieval import create_model
from objretrieval.descriptors import DescriptorStore
from objretrieval.metrics import revisited_map
from objretrieval.reranking import AMES_FUSION, AMESScorer, DatabaseCache, Shortlist, rerank_revisited


def load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--dataset", default="roxford5k", help="roxford5k, rparis6k, ...")
    parser.add_argument("--model", default="dinov2_ames", choices=sorted(AMES_FUSION))
    parser.add_argument("--checkpoint", help="local AMES weights; default: download the authors' checkpoint")
    parser.add_argument("--desc-name", help="descriptor file prefix (default: dinov2 or cvnet, from --model)")
    parser.add_argument("--nn-file", default="nn_superglobal.pkl")
    parser.add_argument("--query-descriptors", type=int, default=600)
    parser.add_argument("--db-descriptors", type=int, default=50)
    parser.add_argument("--top-k", type=int, nargs="+", default=[100], help="shortlist lengths to rerank")
    parser.add_argument("--lamb", type=float, nargs="+", help="default: the model's published value")
    parser.add_argument("--temp", type=float, nargs="+", help="default: the model's published value")
    parser.add_argument(
        "--stream", action="store_true", help="read database descriptors per candidate, no cache"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    folder = args.data_root / args.dataset
    desc = args.desc_name or args.model.split("_")[0]
    gnd = load_pickle(folder / f"gnd_{args.dataset}.pkl")["gnd"]
    shortlist = Shortlist.from_official(load_pickle(folder / args.nn_file))
    if args.checkpoint:
        model = create_model(args.model, checkpoint=args.checkpoint)
    else:
        model = create_model(args.model, pretrained=True)
    model = model.to(args.device).eval()

    with (
        DescriptorStore(folder / f"{desc}_query_local.hdf5") as queries,
        DescriptorStore(folder / f"{desc}_gallery_local.hdf5") as gallery,
    ):
        print(
            f"{args.dataset}: {len(queries)} queries, {len(gallery)} database images, shortlist of "
            f"{shortlist.indices.shape[1]}, {args.model} on {args.device}"
        )
        database: DatabaseCache | DescriptorStore = gallery
        if not args.stream:
            start = time.perf_counter()
            database = DatabaseCache.build(model, gallery, max_descriptors=args.db_descriptors, progress=True)
            print(
                f"database projected in {time.perf_counter() - start:.1f} s, {database.bytes_per_image} B/image"
            )
        scorer = AMESScorer(
            model,
            queries,
            database,
            query_descriptors=args.query_descriptors,
            database_descriptors=args.db_descriptors,
        )
        start = time.perf_counter()
        result = rerank_revisited(scorer, shortlist, gnd, top_k=args.top_k, lamb=args.lamb, temp=args.temp)
        print(f"reranked in {time.perf_counter() - start:.1f} s")
    baseline = revisited_map(shortlist.indices, gnd)
    print(f"global shortlist: M {100 * baseline.medium.map:.2f}, H {100 * baseline.hard.map:.2f}")
    print(result.summary())


if __name__ == "__main__":
    main()
