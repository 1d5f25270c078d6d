"""AVSL pairwise evaluation: objretrieval's blocked scorer vs the official full-matrix evaluator.

Both sides get the same stored features of N images (3 levels x E-dim embeddings and certainties, the
"stage features given" case: the trunk is not timed) and the same trained-looking similarity state, and
compute leave-one-out Recall@1/2/4/8:

- official (``zbr17/AVSL``): ``AVSLCollector`` in eval mode builds the full N x N distance matrix in
  ``split_num=100`` row slices (each slice against all N columns), then every row is sorted and the first
  column (self) dropped, as ``TesterFromMat`` + gedml's ``CalculatorFromMat`` do;
- ours: ``RetrievalEvaluator.from_scorer(AVSLScorer(...))``: query blocks x gallery blocks with a running
  top-k, each pair computed once (the distance is symmetric), memory O(N x k + block).

It also reports the shortlist-then-rescore mode (our addition): a 100-deep top-level-embedding kNN, rescored.

The official code is not part of this repository: point --official at a checkout of github.com/zbr17/AVSL
(its gedml/torchdistlog imports are stubbed; only ``AVSLCollector`` runs).

    uv run python benchmarks/bench_avsl.py --official /path/to/AVSL
    uv run python benchmarks/bench_avsl.py --official /path/to/AVSL --n 2000 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch
from _harness import measure

from objretrieval.metrics import RetrievalEvaluator
from objretrieval.models import AVSL, AVSLFeatures, AVSLScorer

KS = (1, 2, 4, 8)


def official_collector_class(checkout: Path) -> type:
    """The official ``AVSLCollector``, imported with its framework dependencies stubbed out."""

    class _Global:  # gedml's mixins: the collector calls both constructors; nn.Module must run once
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

    class _Base(torch.nn.Module):
        def __init__(self, *args: object, **kwargs: object) -> None:
            if "_parameters" not in self.__dict__:
                torch.nn.Module.__init__(self)

    stubs = {
        "gedml": {},
        "gedml.core": {},
        "gedml.core.collectors": {"BaseCollector": _Base, "_DefaultGlobalCollector": _Global},
        "torchdistlog": {"logging": types.SimpleNamespace(info=print)},
        "torchdistlog.tqdm": {"tqdm": lambda x, **_: x},
    }
    for name, attrs in stubs.items():
        module = sys.modules.setdefault(name, types.ModuleType(name))
        for key, value in attrs.items():
            setattr(module, key, value)
    src = checkout / "src"
    sys.path.insert(0, str(src))
    path = src / "avsl" / "collectors" / "avsl_collector.py"
    spec = importlib.util.spec_from_file_location("avsl.collectors.avsl_collector", path)
    assert spec is not None and spec.loader is not None, f"{path} not found"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.AVSLCollector


def random_state(model: AVSL, generator: torch.Generator) -> None:
    """Links and reliabilities as after training: positive-skewed correlations, varied node reliabilities."""
    sim = model.similarity
    with torch.no_grad():
        sim.links.copy_(torch.randn(sim.links.shape, generator=generator).abs() * 0.1 - 0.02)
        sim.num_link_updates.fill_(1)
        sim.reliability_scale.copy_(1 + 0.5 * torch.randn(sim.reliability_scale.shape, generator=generator))
        sim.reliability_bias.copy_(
            -0.01 + 0.01 * torch.randn(sim.reliability_bias.shape, generator=generator)
        )


def official_recall(collector: torch.nn.Module, feats: AVSLFeatures, labels: torch.Tensor) -> list[float]:
    with torch.no_grad():
        matrix, *_ = collector(
            embed_list=list(feats.embeddings), certainty_list=list(feats.certainties), labels=None
        )
        order = matrix.argsort(dim=1)[:, 1:]  # ascending distance, self (0) first
        hits = labels[order[:, : max(KS)]] == labels[:, None]
    return [float(hits[:, :k].any(1).float().mean()) for k in KS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of github.com/zbr17/AVSL")
    parser.add_argument("--n", type=int, default=5000, help="images (queries = gallery, leave-one-out)")
    parser.add_argument("--dim", type=int, default=512, help="nodes per level (E)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block", type=int, default=32, help="our query/gallery block size")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)

    model = AVSL(None, in_channels=(8, 8, 8), embed_dim=args.dim, topk=128).to(device).eval()
    random_state(model, g)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    centres = [torch.randn(args.classes, args.dim, generator=g) for _ in range(3)]
    feats = AVSLFeatures(
        tuple((c[labels] + 4.0 * torch.randn(args.n, args.dim, generator=g)).to(device) for c in centres),
        tuple((0.02 + 0.03 * torch.rand(args.n, args.dim, generator=g)).to(device) for _ in range(3)),
    )
    labels = labels.to(device)

    collector = official_collector_class(args.official)(
        feature_dim_list=[8, 8, 8], embed_dim=args.dim, num_classes=args.classes, split_num=100, topk_corr=128
    ).to(device)
    collector.load_state_dict(
        {
            **{f"prob_coef_{lv + 1}": w for lv, w in enumerate(model.similarity.reliability_scale.data)},
            **{f"prob_bias_{lv + 1}": b for lv, b in enumerate(model.similarity.reliability_bias.data)},
            "prob_coef_0": torch.ones(args.dim),
            "prob_bias_0": torch.zeros(args.dim),
            "link_0to1": model.similarity.links[0],
            "link_1to2": model.similarity.links[1],
        }
    )
    collector.eval()

    # the official evaluator counts a query without any positive as a miss
    evaluator = RetrievalEvaluator([f"recall@{k}" for k in KS], no_relevant="zero")

    def ours() -> list[float]:
        scorer = AVSLScorer(model, feats)
        result = evaluator.from_scorer(scorer, labels.cpu(), query_block_size=args.block)
        return [result[f"recall@{k}"] for k in KS]

    def shortlisted() -> list[float]:
        scorer = AVSLScorer(model, feats)
        result = evaluator.from_scorer(scorer, labels.cpu(), candidates=scorer.shortlist(100))
        return [result[f"recall@{k}"] for k in KS]

    print(f"AVSL leave-one-out evaluation, {args.n} x {args.n} pairs, E={args.dim}, 3 levels, on {device}")
    theirs, official_s, official_mib = measure(lambda: official_recall(collector, feats, labels))
    print(f"  official full matrix: {official_s:8.1f} s  {official_mib:8.0f} MiB peak  R@{KS}: {theirs}")
    mine, ours_s, ours_mib = measure(ours)
    print(f"  ours, blocked       : {ours_s:8.1f} s  {ours_mib:8.0f} MiB peak  R@{KS}: {mine}")
    short, short_s, short_mib = measure(shortlisted)
    print(f"  ours, shortlist 100 : {short_s:8.1f} s  {short_mib:8.0f} MiB peak  R@{KS}: {short}")
    same = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
    print(f"  largest Recall@K difference ours vs official: {same:.2e}")
    # memory_ratio is ours / reference in every benchmark: below 1 means we use less memory
    print(f"RESULT speedup={official_s / ours_s:.2f} memory_ratio={ours_mib / max(official_mib, 1e-9):.2f}")


if __name__ == "__main__":
    main()
