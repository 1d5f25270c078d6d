"""The PML -> objretrieval mapping of docs/from_pml.md, executed: every row of its tables is an entry here, and
each entry runs pytorch-metric-learning and ours on the same inputs with the translated arguments.

Losses: equal values and equal gradients w.r.t. the embeddings (float64), on the plain batch and on PML's
``(a, p, n)`` / ``(a1, p, a2, n)`` index tuples where the loss takes mined input. Miners: the same mined
tuples (as sets; DistanceWeightedMiner, which samples, the same support and sampling frequencies).
Reducers and distances: through the losses they configure. Samplers: the batch structure both promise.
AccuracyCalculator metrics: against :class:`RetrievalEvaluator` (clustering metrics on the same clustering).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import samplers as pml_samplers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from objretrieval import losses, miners, samplers
from objretrieval.metrics import RetrievalEvaluator, adjusted_mutual_info, kmeans, normalized_mutual_info

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "from_pml.md"
NUM_CLASSES, DIM = 4, 8
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64
# MarginLoss computes d = sqrt(||a - b||^2 + 1e-8) (as MIC does), PML the exact distance: documented
SQRT_EPS = {"rtol": 1e-6, "atol": 1e-7}


def batch(seed: int = 0, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes x 5 samples, float64, overlapping clusters so that every selection keeps something."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(5)
    centres = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64)
    return centres[labels] + spread * torch.randn(len(labels), DIM, generator=g, dtype=torch.float64), labels


def cosine() -> pml_distances.CosineSimilarity:
    return pml_distances.CosineSimilarity()


@dataclass
class LossEntry:
    """A loss row: PML's constructor and ours with the translated arguments, and what to compare."""

    pml: Callable[[], Any]
    ours: Callable[[], Any]
    mined: bool = True  # the loss takes PML's index tuples
    tolerance: dict[str, float] | None = None
    share: str | None = None  # a parameter to copy from ours to PML (proxies, per-class beta)


def copy_parameter(ours: Any, pml: Any, name: str | None) -> None:
    if name is not None:
        getattr(pml, name).data = getattr(ours, name).data.detach().clone().double()
        ours.double()


#: "pml name -> entry"; the keys are the first cells of the docs page's tables.
LOSSES: dict[str, LossEntry] = {
    "ContrastiveLoss": LossEntry(
        lambda: pml_losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.6, distance=cosine()),
        lambda: losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.6),
    ),
    "TripletMarginLoss": LossEntry(
        lambda: pml_losses.TripletMarginLoss(margin=0.1),
        lambda: losses.TripletMarginLoss(margin=0.1),
        tolerance=EXACT,
    ),
    "TripletMarginLoss(distance=CosineSimilarity())": LossEntry(
        lambda: pml_losses.TripletMarginLoss(margin=0.1, distance=cosine()),
        lambda: losses.TripletMarginLoss(margin=0.1, distance="cosine"),
        tolerance=EXACT,
    ),
    "MultiSimilarityLoss": LossEntry(
        lambda: pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
        lambda: losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5),
    ),
    "MarginLoss": LossEntry(
        lambda: pml_losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2),
        lambda: losses.MarginLoss(margin=0.2, beta=1.2),
        tolerance=SQRT_EPS,
    ),
    "MarginLoss(learn_beta=True)": LossEntry(
        lambda: pml_losses.MarginLoss(margin=0.2, beta=1.2, learn_beta=True, num_classes=NUM_CLASSES),
        lambda: losses.MarginLoss(NUM_CLASSES, margin=0.2, beta=1.2),
        tolerance=SQRT_EPS,
        share="beta",
    ),
    "SupConLoss": LossEntry(
        lambda: pml_losses.SupConLoss(temperature=0.1), lambda: losses.SupConLoss(temperature=0.1)
    ),
    "ProxyAnchorLoss": LossEntry(
        lambda: pml_losses.ProxyAnchorLoss(NUM_CLASSES, DIM, margin=0.1, alpha=32),
        lambda: losses.ProxyAnchorLoss(NUM_CLASSES, DIM, margin=0.1, alpha=32.0),
        mined=False,
        share="proxies",
    ),
    "ProxyNCALoss": LossEntry(
        lambda: pml_losses.ProxyNCALoss(NUM_CLASSES, DIM),  # softmax_scale=1 by default
        lambda: losses.ProxyNCALoss(NUM_CLASSES, DIM, softmax_scale=1.0),
        mined=False,
        share="proxies",
    ),
}

#: PML reducer -> our ``reduction=``, checked on every loss that takes both.
REDUCERS: dict[str, tuple[Callable[[], Any], str]] = {
    "AvgNonZeroReducer": (pml_reducers.AvgNonZeroReducer, "mean_nonzero"),
    "MeanReducer": (pml_reducers.MeanReducer, "mean"),
    "SumReducer": (pml_reducers.SumReducer, "sum"),
}
REDUCED_LOSSES = {  # name -> (PML with a reducer, ours with a reduction)
    "ContrastiveLoss": (
        lambda r: pml_losses.ContrastiveLoss(0.9, 0.6, distance=cosine(), reducer=r),
        lambda r: losses.ContrastiveLoss(0.9, 0.6, reduction=r),
    ),
    "TripletMarginLoss": (
        lambda r: pml_losses.TripletMarginLoss(0.1, reducer=r),
        lambda r: losses.TripletMarginLoss(0.1, reduction=r),
    ),
    "MultiSimilarityLoss": (
        lambda r: pml_losses.MultiSimilarityLoss(reducer=r),
        lambda r: losses.MultiSimilarityLoss(reduction=r),
    ),
    "SupConLoss": (lambda r: pml_losses.SupConLoss(reducer=r), lambda r: losses.SupConLoss(reduction=r)),
}

#: PML distance -> the loss/miner argument that selects it (checked through TripletMarginLoss and the miners).
DISTANCES = {
    "LpDistance": (pml_distances.LpDistance, "euclidean"),
    "CosineSimilarity": (pml_distances.CosineSimilarity, "cosine"),
}

#: PML miner -> ours, mined on the same batch; compared as sets of tuples.
MINERS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "TripletMarginMiner": (
        lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        lambda: miners.TripletMarginMiner(margin=0.2, selection="semihard"),
    ),
    "TripletMarginMiner(distance=CosineSimilarity())": (
        lambda: pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="hard", distance=cosine()),
        lambda: miners.TripletMarginMiner(margin=0.1, selection="hard", distance="cosine"),
    ),
    "MultiSimilarityMiner": (
        lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
        lambda: miners.MultiSimilarityMiner(epsilon=0.1),
    ),
    "MultiSimilarityMiner(distance=LpDistance())": (
        lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1, distance=pml_distances.LpDistance()),
        lambda: miners.MultiSimilarityMiner(epsilon=0.1, distance="euclidean"),
    ),
}
SAMPLING_MINERS = {"DistanceWeightedMiner": None}  # tested by frequencies below
OTHER_ROWS = {"CrossBatchMemory", "MPerClassSampler", "HierarchicalSampler"}

#: AccuracyCalculator name -> RetrievalEvaluator name.
METRICS = {
    "precision_at_1": "precision@1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map@r",
    "mean_reciprocal_rank": "mrr",
    "mean_average_precision": "map@K",
}
CLUSTERING = {"NMI": "nmi", "AMI": "ami"}


# -- the docs page and this table cannot drift ------------------------------------------------------------


def docs_rows() -> set[str]:
    """First cells of the page's mapping tables: ``| `Name` | ...`` rows (header and rule rows skipped)."""
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|", DOCS_PAGE.read_text(), flags=re.MULTILINE)
    return set(rows)


def test_every_docs_row_has_a_test_entry_and_back() -> None:
    tested = {*LOSSES, *REDUCERS, *DISTANCES, *MINERS, *SAMPLING_MINERS, *OTHER_ROWS, *METRICS, *CLUSTERING}
    rows = docs_rows()
    assert rows - tested == set(), "rows of docs/from_pml.md without a test entry"
    assert tested - rows == set(), "test entries missing from docs/from_pml.md"


# -- losses: value and gradient, plain and on PML's index tuples -----------------------------------------


def value_and_grad(loss: Any, x: torch.Tensor, y: torch.Tensor, mined: Any = None):
    leaf = x.clone().requires_grad_(True)
    value = loss(leaf, y, mined)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def pml_tuples(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...] | None]:
    return {
        "plain": None,
        "(a1, p, a2, n)": pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, y),
        "(a, p, n)": pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(x, y),
    }


LOSS_CASES = [
    (name, mining)
    for name, entry in LOSSES.items()
    for mining in (["plain", "(a1, p, a2, n)", "(a, p, n)"] if entry.mined else ["plain"])
]


@pytest.mark.parametrize(("name", "mining"), LOSS_CASES)
def test_loss_matches_pml(name: str, mining: str) -> None:
    entry = LOSSES[name]
    x, y = batch()
    mined = pml_tuples(x, y)[mining]
    assert mined is None or len(mined[0]) > 0
    pml, ours = entry.pml(), entry.ours()
    copy_parameter(ours, pml, entry.share)
    expected, expected_grad = value_and_grad(pml, x, y, mined)
    got, grad = value_and_grad(ours, x, y, mined)
    tolerance = entry.tolerance or EXACT
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("name", list(REDUCED_LOSSES))
def test_reducer_is_our_reduction(name: str, reducer: str) -> None:
    x, y = batch(seed=1)
    make_reducer, reduction = REDUCERS[reducer]
    make_pml, make_ours = REDUCED_LOSSES[name]
    for mined in (None, pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, y)):
        expected = value_and_grad(make_pml(make_reducer()), x, y, mined)
        got = value_and_grad(make_ours(reduction), x, y, mined)
        torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("name", list(DISTANCES))
def test_distance_is_our_distance_argument(name: str) -> None:
    x, y = batch(seed=2)
    make_distance, ours = DISTANCES[name]
    expected = value_and_grad(pml_losses.TripletMarginLoss(0.1, distance=make_distance()), x, y)
    got = value_and_grad(losses.TripletMarginLoss(0.1, distance=ours), x, y)
    torch.testing.assert_close(got, expected, **EXACT)
    pml_mined = pml_miners.TripletMarginMiner(0.1, "all", distance=make_distance())(x, y)
    assert as_set(miners.TripletMarginMiner(0.1, "all", distance=ours)(x, y)) == as_set(pml_mined)


def test_cross_batch_memory_matches_pml() -> None:
    pml = pml_losses.CrossBatchMemory(
        pml_losses.MultiSimilarityLoss(), DIM, memory_size=30, miner=pml_miners.MultiSimilarityMiner(0.1)
    )
    ours = losses.CrossBatchMemory(
        losses.MultiSimilarityLoss(), size=30, miner=miners.MultiSimilarityMiner(0.1), embedding_size=DIM
    )
    for seed in range(3):  # the third batch wraps the memory around
        x, y = batch(seed=seed)
        expected, got = value_and_grad(pml, x, y), value_and_grad(ours, x, y)
        torch.testing.assert_close(got, expected, **EXACT)


# -- miners ------------------------------------------------------------------------------------------------


def as_set(mined: Any) -> set[tuple[str, tuple[int, ...]]]:
    """A mining as a set of tagged tuples, whichever of PML's or our structures it comes in."""
    if isinstance(mined, miners.MinedPairs):
        mined = mined.to_indices()
    mined = [t.tolist() for t in mined]
    if len(mined) == 3:
        return {("triplet", t) for t in zip(*mined, strict=True)}
    a1, p, a2, n = mined
    return {("pos", t) for t in zip(a1, p, strict=True)} | {("neg", t) for t in zip(a2, n, strict=True)}


@pytest.mark.parametrize("name", list(MINERS))
def test_miner_mines_the_same_tuples_as_pml(name: str) -> None:
    x, y = batch(seed=3)
    make_pml, make_ours = MINERS[name]
    expected = as_set(make_pml()(x, y))
    assert expected, "the batch must give the miner something to mine"
    assert as_set(make_ours()(x, y)) == expected


def negative_frequencies(triplets: list[tuple[torch.Tensor, ...]], n: int) -> torch.Tensor:
    """(N, N) frequency of each negative per anchor, over all draws."""
    counts = torch.zeros(n, n, dtype=torch.float64)
    for a, _, neg in triplets:
        counts.index_put_((a, neg), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(1, keepdim=True)


def test_distance_weighted_miner_samples_as_pml() -> None:
    """Both sample: the same negatives are possible, drawn with the same frequencies (many draws)."""
    x, y = batch(seed=4, spread=0.6)
    x = torch.nn.functional.normalize(x, dim=1)
    torch.manual_seed(0)
    pml_miner = pml_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    pml = negative_frequencies([pml_miner(x, y) for _ in range(400)], len(y))
    ours_miner = miners.DistanceWeightedMiner(
        cutoff=0.5,
        nonzero_loss_cutoff=1.4,
        triplets_per_anchor=50,
        generator=torch.Generator().manual_seed(0),
    )
    ours = negative_frequencies([tuple(ours_miner(x, y)) for _ in range(40)], len(y))
    assert torch.equal(pml > 0, ours > 0), "the same (anchor, negative) pairs must be possible"
    assert (pml > 0).sum() < (y[:, None] != y[None, :]).sum(), "the cut-off must exclude some negatives"
    torch.testing.assert_close(ours, pml, rtol=0, atol=0.06)


# -- samplers: the batch structure both promise ----------------------------------------------------------


def class_counts(batch_indices: list[int], labels: torch.Tensor) -> list[int]:
    return torch.unique(labels[torch.as_tensor(batch_indices)], return_counts=True)[1].tolist()


def test_m_per_class_sampler_gives_pmls_batch_structure() -> None:
    labels = torch.arange(8).repeat_interleave(6)
    pml_batches = list(pml_samplers.MPerClassSampler(labels, m=3, batch_size=12, length_before_new_iter=48))
    pml_batches = [pml_batches[i : i + 12] for i in range(0, len(pml_batches), 12)]
    ours = list(samplers.MPerClassSampler(labels, batch_size=12, m=3, seed=0))
    for batches in (pml_batches, ours):
        assert batches and all(class_counts(b, labels) == [3, 3, 3, 3] for b in batches)


def test_hierarchical_sampler_gives_pmls_batch_structure() -> None:
    fine = torch.arange(12).repeat_interleave(4)
    coarse = fine // 3  # four super-classes of three classes
    pml = pml_samplers.HierarchicalSampler(
        torch.stack([fine, coarse], 1), batch_size=12, samples_per_class=2, super_classes_per_batch=2
    )
    ours = samplers.HierarchicalSampler(fine, coarse, batch_size=12, m=2, seed=0)
    for batches in (list(pml), list(ours)):
        assert batches
        for b in batches:
            assert len(b) == 12 and all(c == 2 for c in class_counts(b, fine))
            # two super-classes, half a batch each
            assert sorted(torch.unique(coarse[torch.as_tensor(b)], return_counts=True)[1].tolist()) == [6, 6]


# -- AccuracyCalculator metrics ---------------------------------------------------------------------------


def blobs(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 8, (60,), generator=g)
    return torch.randn(8, DIM, generator=g)[labels] + 0.9 * torch.randn(60, DIM, generator=g), labels


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_accuracy_calculator_metrics_match_the_evaluator(leave_one_out: bool) -> None:
    x, y = blobs()
    gallery = () if leave_one_out else blobs(seed=6)
    k = 16  # PML's k is the depth of its kNN; ours is the K of map@K
    calculator = AccuracyCalculator(include=tuple(METRICS), k=k, device=torch.device("cpu"))
    # mean_reciprocal_rank over the whole ranking in ours: PML's at k = the gallery size
    expected = calculator.get_accuracy(x, y, *gallery)
    expected["mean_reciprocal_rank"] = AccuracyCalculator(
        include=("mean_reciprocal_rank", "precision_at_1"), k=None, device=torch.device("cpu")
    ).get_accuracy(x, y, *gallery)["mean_reciprocal_rank"]
    names = [METRICS[m].replace("@K", f"@{k}") for m in METRICS]
    got = RetrievalEvaluator(names, metric="l2")(x, y, *gallery)  # PML's default: exact L2 kNN
    assert int(torch.bincount(y).max()) <= k, "PML cuts R at its k: keep every class within it"
    for pml_name, name in zip(METRICS, names, strict=True):
        assert got[name] == pytest.approx(expected[pml_name], abs=1e-6), pml_name


def test_clustering_metrics_match_pml_on_the_same_clustering() -> None:
    """PML clusters with faiss k-means, ours with its own: compared on one clustering, PML's formulas."""
    x, y = blobs()
    assignment, _ = kmeans(x, num_clusters=8)
    calculator = AccuracyCalculator(include=("NMI", "AMI"), device=torch.device("cpu"))
    ours = {
        "NMI": normalized_mutual_info(assignment, y),
        "AMI": adjusted_mutual_info(assignment, y),
    }
    assert 0.2 < ours["NMI"] < 0.999, "a clustering with mistakes, so the comparison means something"
    assert ours["NMI"] == pytest.approx(calculator.calculate_NMI(y, assignment), abs=1e-10)
    assert ours["AMI"] == pytest.approx(calculator.calculate_AMI(y, assignment), abs=1e-10)
    # the evaluator's names: the same formulas on its k-means (k = number of classes, seed kmeans_seed)
    result = RetrievalEvaluator(list(CLUSTERING.values()), kmeans_seed=1234)(x, y)
    for pml_name, name in CLUSTERING.items():
        assert result[name] == pytest.approx(ours[pml_name], abs=1e-10), name
