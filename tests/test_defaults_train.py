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
from digits import embed, small_cnn, train, zero_shot_split

from objretrieval import RetrievalEvaluator
from objretrieval.losses import (
    ContextualLoss,
    ContrastiveLoss,
    MarginLoss,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    ROADMAPLoss,
    SmoothAPLoss,
    SupConLoss,
    TripletMarginLoss,
)
from objretrieval.miners import MultiSimilarityMiner

SIZE, DIM, WIDTH, STEPS, PRETRAIN_STEPS, M = 16, 64, 16, 300, 300, 16
GAIN = 5.0  # Recall@1 points over the untrained network; the seed-to-seed noise of this setup is ~2-3
LOSSES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "contrastive": lambda: (ContrastiveLoss(), None),
    "triplet": lambda: (TripletMarginLoss(), None),
    "multi_similarity": lambda: (MultiSimilarityLoss(), None),
    "multi_similarity+miner": lambda: (MultiSimilarityLoss(), MultiSimilarityMiner()),
    "margin": lambda: (MarginLoss(), None),
    "proxy_anchor": lambda: (ProxyAnchorLoss(5, DIM), None),
    "proxy_nca": lambda: (ProxyNCALoss(5, DIM), None),
    "smooth_ap": lambda: (SmoothAPLoss(), None),
    "roadmap": lambda: (ROADMAPLoss(), None),
    "contextual": lambda: (ContextualLoss(), None),
    "supcon": lambda: (SupConLoss(), None),
}


class _Task:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.train_x, self.train_y, self.test_x, self.test_y = zero_shot_split(0, size=SIZE)
        self.evaluator = RetrievalEvaluator(["recall@1"])
        self.untrained = self.recall(self.network("random"))
        pretrained = self.network("random")  # trained with another loss, on other batches
        train(
            pretrained, TripletMarginLoss(0.2), self.train_x, self.train_y, steps=PRETRAIN_STEPS, seed=1, m=M
        )
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
    train(model, loss_fn, task.train_x, task.train_y, steps=STEPS, seed=0, miner=miner, m=M)
    recall = task.recall(model)
    assert recall > task.untrained + GAIN, f"{name}: R@1 {recall:.1f}, untrained {task.untrained:.1f}"
    if start == "pretrained":  # fine-tuning must not undo the pretraining
        assert recall > task.pretrained - GAIN, f"{name}: R@1 {recall:.1f}, pretrained {task.pretrained:.1f}"


PRESET_LOSSES = [
    ContrastiveLoss,
    TripletMarginLoss,
    MultiSimilarityLoss,
    SmoothAPLoss,
    ROADMAPLoss,
    ContextualLoss,
    MarginLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
]
NEEDS = {MarginLoss: {"num_classes": 3}, ProxyAnchorLoss: {"num_classes": 3, "embedding_size": 8}}
NEEDS[ProxyNCALoss] = NEEDS[ProxyAnchorLoss]


@pytest.mark.parametrize("cls", PRESET_LOSSES, ids=lambda c: c.__name__)
def test_every_preset_is_its_documented_arguments(cls: type) -> None:
    assert cls.presets, f"{cls.__name__} has no preset"
    torch.manual_seed(0)
    x, y = torch.randn(12, 8), torch.arange(3).repeat_interleave(4)
    for name, arguments in cls.presets.items():
        assert name in (cls.__doc__ or ""), f"preset {name!r} is not documented in {cls.__name__}'s docstring"
        torch.manual_seed(1)
        preset = cls.from_preset(name, **NEEDS.get(cls, {}))
        torch.manual_seed(1)
        explicit = cls(**arguments, **NEEDS.get(cls, {}))
        torch.testing.assert_close(preset(x, y), explicit(x, y), rtol=0, atol=0)


def test_from_preset_applies_overrides_and_rejects_unknown_names() -> None:
    assert ContrastiveLoss.from_preset("liao2023").pos_margin == 0.9
    assert ContrastiveLoss.from_preset("liao2023", neg_margin=0.4).neg_margin == 0.4
    assert ContextualLoss.from_preset("cub").eps == 0.04 and ContextualLoss.from_preset("cub").k == 4
    with pytest.raises(
        ValueError, match=r"unknown preset 'inat' for ContextualLoss; available: '256', 'cars'"
    ):
        ContextualLoss.from_preset("inat")


def test_contextual_k_defaults_to_the_images_per_class_of_the_batch() -> None:
    torch.manual_seed(0)
    x = torch.randn(24, 8)
    balanced = torch.arange(4).repeat_interleave(6)
    torch.testing.assert_close(ContextualLoss()(x, balanced), ContextualLoss(k=6)(x, balanced))
    uneven = torch.tensor([0] * 10 + [1] * 9 + [2] * 5)  # the smallest class decides
    torch.testing.assert_close(ContextualLoss()(x, uneven), ContextualLoss(k=5)(x, uneven))
    assert ContextualLoss()(x, uneven) != ContextualLoss(k=4)(x, uneven)
    singletons = torch.tensor([0] * 20 + [1, 2, 3, 4])  # at least 2
    torch.testing.assert_close(ContextualLoss()(x, singletons), ContextualLoss(k=2)(x, singletons))
