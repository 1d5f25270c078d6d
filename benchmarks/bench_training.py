"""Do the losses train at their defaults? Each one beside pytorch-metric-learning's (PML) at PML's defaults.

The task a new user tries first: a small CNN (no batch norm, unnormalised output, random init) trained with
Adam 1e-3 on batches of 5 classes x 16 (``MPerClassSampler``) of random views of scikit-learn's digits 0-4,
then evaluated zero-shot on random views of the unseen digits 5-9 (leave-one-out retrieval, cosine). Every
loss gets the same network, data, schedule and seeds; only the loss (and its miner, where PML pairs one with
it) changes. Raw pixels and the untrained network are the baselines.

``--start pretrained`` first trains the network with ``TripletMarginLoss(margin=0.2)`` on other batches, then
fine-tunes it with each loss: the defaults must also work from a start that is already a good embedding
(there the gains are over that start).

Targets (Recall@1, mean over seeds): every loss at least 10 points above the untrained network, at most 2
below PML's equivalent, and ``ContextualLoss`` at or above ``ContrastiveLoss``. The last line is
``RESULT min_gain_over_untrained=... max_deficit_vs_pml=... contextual_minus_contrastive=...`` in points.

Run:  uv run python benchmarks/bench_training.py            (about 3 minutes on one core)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import embed, small_cnn, train, zero_shot_split

from objretrieval import RetrievalEvaluator
from objretrieval import losses as ours
from objretrieval.miners import MultiSimilarityMiner

NUM_CLASSES, DIM = 5, 64
# name -> (ours, PML's equivalent or None); each factory returns (loss, miner or None)
Factory = Callable[[], tuple[nn.Module, Any]]
LOSSES: dict[str, tuple[Factory, Factory | None]] = {
    "ContrastiveLoss": (
        lambda: (ours.ContrastiveLoss(), None),
        lambda: (pml_losses.ContrastiveLoss(), None),
    ),
    "TripletMarginLoss": (
        lambda: (ours.TripletMarginLoss(), None),
        lambda: (pml_losses.TripletMarginLoss(), None),
    ),
    "MultiSimilarityLoss": (
        lambda: (ours.MultiSimilarityLoss(), None),
        lambda: (pml_losses.MultiSimilarityLoss(), None),
    ),
    "MultiSimilarityLoss+miner": (
        lambda: (ours.MultiSimilarityLoss(), MultiSimilarityMiner()),
        lambda: (pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner()),
    ),
    "MarginLoss": (
        lambda: (ours.MarginLoss(), None),
        lambda: (pml_losses.MarginLoss(), None),
    ),
    "ProxyAnchorLoss": (
        lambda: (ours.ProxyAnchorLoss(NUM_CLASSES, DIM), None),
        lambda: (pml_losses.ProxyAnchorLoss(NUM_CLASSES, DIM), None),
    ),
    "ProxyNCALoss": (
        lambda: (ours.ProxyNCALoss(NUM_CLASSES, DIM), None),
        lambda: (pml_losses.ProxyNCALoss(NUM_CLASSES, DIM), None),
    ),
    "SmoothAPLoss": (
        lambda: (ours.SmoothAPLoss(), None),
        lambda: (pml_losses.SmoothAPLoss(), None),
    ),
    "SupConLoss": (
        lambda: (ours.SupConLoss(), None),
        lambda: (pml_losses.SupConLoss(), None),
    ),
    "ROADMAPLoss": (lambda: (ours.ROADMAPLoss(), None), None),
    "ContextualLoss": (lambda: (ours.ContextualLoss(), None), None),
}


def pretrain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> None:
    """Train with another loss on other batches first: the "pretrained network" a user fine-tunes."""
    train(model, ours.TripletMarginLoss(0.2), images, labels, steps=steps, seed=seed + 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="digit images are upsampled to size x size")
    parser.add_argument("--start", choices=("random", "pretrained"), default="random")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--only", nargs="*", default=None, help="names of the losses to run (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(LOSSES)
    evaluator = RetrievalEvaluator(["recall@1", "map@r"])

    results: dict[str, list[tuple[float, float]]] = {}
    seconds: dict[str, float] = {}

    def record(row: str, value: dict[str, float], elapsed: float = 0.0) -> None:
        results.setdefault(row, []).append((100 * value["recall@1"], 100 * value["map@r"]))
        seconds[row] = seconds.get(row, 0.0) + elapsed

    start = time.perf_counter()
    for seed in range(args.seeds):
        train_x, train_y, test_x, test_y = zero_shot_split(seed, size=args.size)
        record("raw pixels", evaluator(test_x.flatten(1), test_y).metrics)

        torch.manual_seed(seed)
        start_model = small_cnn(DIM)
        if args.start == "pretrained":
            pretrain(start_model, train_x, train_y, args.pretrain_steps, seed)
        record(f"{args.start} start", evaluator(embed(start_model, test_x), test_y).metrics)
        for name in names:
            for impl, factory in zip(("ours", "PML"), LOSSES[name], strict=True):
                if factory is None:
                    continue
                model = copy.deepcopy(start_model)
                torch.manual_seed(seed)  # the same proxies / margins for ours and PML
                loss_fn, miner = factory()
                tic = time.perf_counter()
                train(model, loss_fn, train_x, train_y, steps=args.steps, seed=seed, miner=miner)
                record(
                    f"{name} ({impl})",
                    evaluator(embed(model, test_x), test_y).metrics,
                    time.perf_counter() - tic,
                )

    print(
        f"digits 0-4 -> random views of 5-9, {args.start} start, {args.steps} steps x {args.seeds} seeds, "
        f"{args.size}x{args.size}, {torch.get_num_threads()} thread(s)"
    )
    header = f"{'':<34}{'R@1':>7}{'spread':>8}{'MAP@R':>7}{'s/run':>7}"
    print(header + "\n" + "-" * len(header))
    mean: dict[str, float] = {}
    for row, values in results.items():
        r1 = [v[0] for v in values]
        mean[row] = statistics.fmean(r1)
        spread = max(r1) - min(r1)
        print(
            f"{row:<34}{mean[row]:>7.1f}{spread:>8.1f}{statistics.fmean(v[1] for v in values):>7.1f}"
            f"{seconds[row] / len(values):>7.1f}"
        )
    print(f"spread = max - min over seeds (the noise); {time.perf_counter() - start:.0f} s in total")

    baseline = mean[f"{args.start} start"]
    gains = [mean[f"{n} (ours)"] - baseline for n in names]
    deficits = [mean[f"{n} (PML)"] - mean[f"{n} (ours)"] for n in names if f"{n} (PML)" in mean]
    contextual = (
        mean["ContextualLoss (ours)"] - mean["ContrastiveLoss (ours)"]
        if {"ContextualLoss", "ContrastiveLoss"} <= set(names)
        else float("nan")
    )
    print(
        f"RESULT min_gain_over_untrained={min(gains):.1f} "
        f"max_deficit_vs_pml={max(deficits, default=float('nan')):.1f} "
        f"contextual_minus_contrastive={contextual:.1f}"
    )


if __name__ == "__main__":
    main()
