"""Every metric loss trains at its defaults: from a random start and from a pretrained one.

The task of ``benchmarks/bench_training.py`` in a tiny configuration: a small CNN (no batch norm, unnormalised
output) trained with Adam 1e-3 on 5 classes x 16 random views of scikit-learn's digits 0-4, evaluated on random
views of the unseen digits 5-9. Fixed seeds and one thread make each run deterministic.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import embed, small_cnn, train, zero_shot_split  # noqa: E402

from objretrieval import RetrievalEvaluator  # noqa: E402
from objretrieval.losses import (  # noqa: E402
    ContextualLoss,
    ContrastiveLoss,
    MarginLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    TripletMarginLoss,
)
from objretrieval.miners import MultiSimilarityMiner  # noqa: E402

SIZE, DIM, WIDTH, STEPS, PRETRAIN_STEPS = 16, 64, 16, 300, 300
GAIN = 5.0  # Recall@1 points over the untrained network; the seed-to-seed noise of this setup is ~2-3
LOSSES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "contrastive": lambda: (ContrastiveLoss(), None),
    "triplet": lambda: (TripletMarginLoss(), None),
    "multi_similarity": lambda: (MultiSimilarityLoss(), None),
    "multi_similarity+miner": lambda: (MultiSimilarityLoss(), MultiSimilarityMiner()),
    "margin": lambda: (MarginLoss(5), None),
    "proxy_anchor": lambda: (ProxyAnchorLoss(5, DIM), None),
    "proxy_nca": lambda: (ProxyNCALoss(5, DIM), None),
    "smooth_ap": lambda: (SmoothAPLoss(), None),
    "roadmap": lambda: (ROADMAPLoss(), None),
    "contextual": lambda: (ContextualLoss(), None),
}


class _Task:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.train_x, self.train_y, self.test_x, self.test_y = zero_shot_split(0, size=SIZE)
        self.evaluator = RetrievalEvaluator(["recall@1"])
        self.untrained = self.recall(self.network("random"))
        pretrained = self.network("random")  # trained with another loss, on other batches
        train(pretrained, TripletMarginLoss(0.2), self.train_x, self.train_y, steps=PRETRAIN_STEPS, seed=1)
        self.pretrained_state = pretrained.state_dict()
        self.pretrained = self.recall(pretrained)

    def network(self, start: str) -> nn.Module:
        torch.manual_seed(0)
        model = small_cnn(DIM, WIDTH)
        if start == "pretrained":
            model.load_state_dict(self.pretrained_state)
        return model

    def recall(self, model: nn.Module) -> float:
        return 100 * self.evaluator(embed(model, self.test_x), self.test_y)["recall@1"]


@pytest.fixture(scope="module")
def task() -> Iterator[_Task]:
    threads = torch.get_num_threads()
    yield _Task()
    torch.set_num_threads(threads)


def test_the_pretrained_start_is_a_better_embedding(task: _Task) -> None:
    assert task.pretrained > task.untrained + GAIN


@pytest.mark.parametrize("start", ["random", "pretrained"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_at_its_defaults_improves_retrieval(task: _Task, name: str, start: str) -> None:
    torch.set_num_threads(1)
    model = task.network(start)
    torch.manual_seed(0)
    loss_fn, miner = LOSSES[name]()
    train(model, loss_fn, task.train_x, task.train_y, steps=STEPS, seed=0, miner=miner)
    recall = task.recall(model)
    assert recall > task.untrained + GAIN, f"{name}: R@1 {recall:.1f}, untrained {task.untrained:.1f}"
    if start == "pretrained":  # fine-tuning must not undo the pretraining
        assert recall > task.pretrained - GAIN, f"{name}: R@1 {recall:.1f}, pretrained {task.pretrained:.1f}"
