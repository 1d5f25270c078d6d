"""Exact kNN throughput: objretrieval's streaming search (CPU or CUDA) vs faiss IndexFlat on the CPU.

Searches a query set against a gallery of random unit vectors (inner product, or squared L2 with
--metric l2) and reports time, queries per second, peak memory and agreement of the returned neighbours with
faiss.

    uv run python benchmarks/bench_knn.py                                   # CPU, 100k x 768 gallery
    uv run python benchmarks/bench_knn.py --metric l2                       # squared Euclidean distance
    uv run python benchmarks/bench_knn.py --device cuda --gallery 1000000 --queries 10000   # the GPU run
    uv run python benchmarks/bench_knn.py --device cuda --dtype float16 ...                  # half storage

On CUDA the gallery is streamed from host memory block by block, as it would be from an h5py file; add
--gallery-on-device to keep it on the GPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from objretrieval.search import knn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--metric", choices=["ip", "l2"], default="ip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--gallery-on-device", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, args.dim, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    block = args.block_size or (65536 if device.type == "cuda" else 4096)
    q = queries.to(device, dtype)
    g = gallery.to(dtype)
    if args.gallery_on_device:
        g = g.to(device)

    def ours() -> torch.Tensor:
        result = knn(
            q, g, k=args.k, metric=args.metric, block_size=block, query_block_size=max(4096, args.queries)
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result.indices.cpu()

    ours()  # warm-up (CUDA context, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    indices = ours()
    seconds = time.perf_counter() - start
    print(
        f"gallery {args.gallery:,} x {args.dim}, {args.queries:,} queries, k={args.k}, {args.metric}, "
        f"{args.dtype}, {device}"
    )
    print(
        f"objretrieval: {seconds:.2f} s, {args.queries / seconds:,.0f} queries/s, "
        f"{2 * args.gallery * args.queries * args.dim / seconds / 1e9:,.0f} GFLOP/s"
    )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")

    if not args.skip_faiss:
        import faiss

        index = faiss.IndexFlatL2(args.dim) if args.metric == "l2" else faiss.IndexFlatIP(args.dim)
        index.add(np.ascontiguousarray(gallery.to(dtype).float().numpy()))
        start = time.perf_counter()
        _, reference = index.search(np.ascontiguousarray(queries.to(dtype).float().numpy()), args.k)
        faiss_seconds = time.perf_counter() - start
        agree = (indices.numpy() == reference).mean()
        print(
            f"faiss (CPU, {faiss.omp_get_max_threads()} threads): {faiss_seconds:.2f} s; "
            f"neighbours identical: {agree:.4%}"
        )
        print(
            f"RESULT seconds={seconds:.3f} speedup_vs_faiss_cpu={faiss_seconds / seconds:.2f} "
            f"agreement={agree:.4f}"
        )


if __name__ == "__main__":
    main()
