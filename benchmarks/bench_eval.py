"""Leave-one-out evaluation: objretrieval's RetrievalEvaluator vs PML's AccuracyCalculator.

Both compute precision@1, R-precision and MAP@R on the same L2-normalised embeddings (dim 512, about five
images per class) in this one process. PML runs its default exact faiss search (IndexFlatL2; on unit vectors
the same ranking as our cosine search). Reports wall time, peak resident memory above the pre-call baseline
(VmHWM, reset between runs) and the largest difference between the two libraries' values.

Then our evaluator with ``precision="bf16-exact"`` (bfloat16 screening products, exact scores for every pair
within the bound of a top-k) against our float32 engine, timed alternately ``--repeats`` times each: the
speed-up (median float32 time / median bf16-exact time, with the spread of the runs) and whether every
per-query value is identical (``bf16_identical``).

    uv run --group bench python benchmarks/bench_eval.py              # N = 10,000 and 60,000
    uv run --group bench python benchmarks/bench_eval.py --sizes 2000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _harness import measure

from objretrieval import RetrievalEvaluator

METRICS = {
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
}


def make_embeddings(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around random class centres; class sizes uniform in 3..7."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 8, size=n // 3)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    x = centres[labels] + 2.2 * rng.standard_normal((n, dim)).astype(np.float32)
    perm = rng.permutation(n)
    x = torch.nn.functional.normalize(torch.from_numpy(x[perm]), dim=1)
    return x.contiguous(), torch.from_numpy(labels[perm]).long()


def run(n: int, dim: int, seed: int) -> tuple[float, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = make_embeddings(n, dim, seed)
    ours_eval = RetrievalEvaluator(list(METRICS), metric="cosine")
    pml = AccuracyCalculator(include=tuple(METRICS.values()), k="max_bin_count", device=torch.device("cpu"))

    ours, t_ours, m_ours = measure(lambda: ours_eval(x, y))
    theirs, t_pml, m_pml = measure(lambda: pml.get_accuracy(x, y))

    print(
        f"\nN = {n:,}, dim {dim}, {int(torch.unique(y).numel()):,} classes, {torch.get_num_threads()} threads"
    )
    print(f"{'':<14}{'objretrieval':>14}{'PML':>14}{'|diff|':>10}")
    worst = 0.0
    for name, pml_name in METRICS.items():
        diff = abs(ours[name] - theirs[pml_name])
        worst = max(worst, diff)
        print(f"{name:<14}{ours[name]:>14.7f}{theirs[pml_name]:>14.7f}{diff:>10.1e}")
    print(f"{'time (s)':<14}{t_ours:>14.2f}{t_pml:>14.2f}   speedup {t_pml / t_ours:.2f}x")
    print(f"{'peak (MiB)':<14}{m_ours:>14.0f}{m_pml:>14.0f}   ratio {m_ours / max(m_pml, 1e-9):.4f}")
    print(f"values identical to float32 precision: {worst < 1e-6} (max |diff| {worst:.1e})")
    return t_pml / t_ours, m_ours / max(m_pml, 1e-9)


def run_bf16(n: int, dim: int, seed: int, repeats: int) -> tuple[float, bool]:
    """Our float32 engine against bf16-exact on the same data, alternating runs: (speed-up, identical)."""
    x, y = make_embeddings(n, dim, seed)
    engines = {
        p: RetrievalEvaluator(list(METRICS), metric="cosine", precision=p, return_per_query=True)
        for p in ("float32", "bf16-exact")
    }
    times: dict[str, list[float]] = {p: [] for p in engines}
    results = {}
    for _ in range(repeats):
        for p, ev in engines.items():
            start = time.perf_counter()
            results[p] = ev(x, y)
            times[p].append(time.perf_counter() - start)
    f32, low = results["float32"], results["bf16-exact"]
    identical = f32.metrics == low.metrics and all(
        torch.equal(f32.per_query[m], low.per_query[m]) for m in METRICS
    )
    t32, t16 = statistics.median(times["float32"]), statistics.median(times["bf16-exact"])
    assert low.search is not None and f32.search is not None
    print(f"\nN = {n:,}: float32 engine vs bf16-exact, {repeats} alternating runs each")
    for p, ts in times.items():
        print(f"{p:<12} median {statistics.median(ts):7.2f} s   runs {', '.join(f'{t:.2f}' for t in ts)}")
    print(
        f"speed-up {t32 / t16:.2f}x (spread of the ratio: {min(times['float32']) / max(times['bf16-exact']):.2f}"
        f" .. {max(times['float32']) / min(times['bf16-exact']):.2f}); identical per-query values: {identical}"
    )
    print(
        f"pairs scored exactly per query: float32 {f32.search.rescored_per_query:.1f}, "
        f"bf16-exact {low.search.rescored_per_query:.1f} (of {n - 1} screened)"
    )
    return t32 / t16, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each precision")
    args = parser.parse_args()
    results = [run(n, args.dim, args.seed) for n in args.sizes]
    speedup, memory_ratio = results[-1]
    bf16_speedup, bf16_identical = run_bf16(args.sizes[-1], args.dim, args.seed, args.repeats)
    print(
        f"RESULT speedup={speedup:.2f} memory_ratio={memory_ratio:.4f} bf16_speedup={bf16_speedup:.2f} "
        f"bf16_identical={int(bf16_identical)}"
    )


if __name__ == "__main__":
    main()
