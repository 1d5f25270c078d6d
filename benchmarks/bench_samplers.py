"""Time one epoch of the batch samplers at Stanford Online Products scale (the timing the tests leave out).

SOP's training split has 59,551 images of 11,318 classes in 12 super-classes; the labels here are drawn
uniformly with those counts. Each sampler builds its epoch (``list(sampler)``); PML's ``MPerClassSampler``
(which yields indices, not batches) runs beside ours over the same number of samples.

    uv run python benchmarks/bench_samplers.py
    uv run python benchmarks/bench_samplers.py --samples 200000 --classes 40000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from objretrieval.samplers import ClusterBatchSampler, HierarchicalSampler, MPerClassSampler


def seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` runs of ``fn`` after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--classes", type=int, default=11_318)
    parser.add_argument("--super-labels", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.samples)
    supers = labels % args.super_labels
    common = {"small_classes": "replace"}
    samplers: dict[str, Any] = {
        "MPerClassSampler": MPerClassSampler(labels, args.batch_size, args.m, **common),
        "HierarchicalSampler": HierarchicalSampler(labels, supers, args.batch_size, args.m, **common),
        "ClusterBatchSampler": ClusterBatchSampler(labels, args.batch_size, args.m, **common),
    }
    print(f"{args.samples} samples, {args.classes} classes, batch {args.batch_size}, m={args.m}")
    print(f"{'sampler':<24}{'batches':>9}{'epoch s':>10}")
    for name, sampler in samplers.items():
        print(f"{name:<24}{len(sampler):>9}{seconds(lambda s=sampler: list(s), args.repeats):>10.3f}")
    try:
        from pytorch_metric_learning.samplers import MPerClassSampler as PMLSampler
    except ImportError:
        return
    pml = PMLSampler(labels, m=args.m, batch_size=args.batch_size, length_before_new_iter=args.samples)
    print(
        f"{'PML MPerClassSampler':<24}{len(pml) // args.batch_size:>9}{seconds(lambda: list(pml), args.repeats):>10.3f}"
    )


if __name__ == "__main__":
    main()
