"""The metric table, MRR, AMI, per-class averaging and custom label comparison: against pytorch-metric-learning's
AccuracyCalculator, scikit-learn and brute force; and the argument checks of the metrics API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import adjusted_mutual_info_score

from objretrieval.metrics import (
    MetricSpec,
    RelevantRanks,
    RetrievalEvaluator,
    adjusted_mutual_info,
    gldv2_map,
    kmeans,
    list_metrics,
    mean_average_precision,
    ranks_exhaustive,
    register_metric,
    registry,
    revisited_map,
)
from objretrieval.metrics import ranks as ranks_module

PML_NAMES = {
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
    "mrr": "mean_reciprocal_rank",
}


def coarse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hierarchical labels (N, 2) = (coarse, fine): relevant means the same coarse class."""
    return a[..., 0] == b[..., 0]


def blobs(n: int, num_classes: int, seed: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous embeddings (no score ties, so any exact kNN gives the same ranking) and class labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    centres = torch.randn(num_classes, dim, generator=g)
    return centres[labels] + 0.9 * torch.randn(n, dim, generator=g), labels


def hierarchical(labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([labels // 3, labels], dim=1)  # three fine classes per coarse class


def pml(include: tuple[str, ...], k, **kwargs) -> AccuracyCalculator:
    return AccuracyCalculator(include=include, k=k, device=torch.device("cpu"), **kwargs)


def pml_accuracy(names: list[str], x, y, gallery=None, **kwargs) -> dict[str, float]:
    """PML's values for our metric names: MRR over the whole ranking (k=None), the rest at k=max_bin_count."""
    args = (x, y) if gallery is None else (x, y, *gallery)
    out = {}
    for name in names:
        k = None if name == "mrr" else "max_bin_count"
        # PML searches only when a metric it lists as needing kNN is included; MRR is not in that list.
        include = (PML_NAMES[name], "precision_at_1")
        out[name] = pml(include, k, **kwargs).get_accuracy(*args)[PML_NAMES[name]]
    return out


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("average", ["query", "class"])
def test_ranking_metrics_match_pml(leave_one_out: bool, average: str) -> None:
    x, y = blobs(90, 12, seed=1)
    gallery = None if leave_one_out else blobs(70, 15, seed=2)
    names = list(PML_NAMES)
    ours = RetrievalEvaluator(names, metric="l2", average=average)  # PML's default: exact L2 kNN
    got = ours(x, y) if gallery is None else ours(x, y, *gallery)
    expected = pml_accuracy(names, x, y, gallery, avg_of_avgs=average == "class")
    assert got.metrics == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("average", ["query", "class"])
def test_label_comparison_fn_matches_pml(leave_one_out: bool, average: str) -> None:
    x, y = blobs(80, 12, seed=3)
    args: tuple = (x, hierarchical(y))
    if not leave_one_out:
        g, gy = blobs(60, 12, seed=4)
        args = (*args, g, hierarchical(gy))
    names = list(PML_NAMES)
    ours = RetrievalEvaluator(names, metric="l2", average=average, label_comparison_fn=coarse)
    got = ours(*args)
    expected = pml_accuracy(
        names, *args[:2], args[2:] or None, avg_of_avgs=average == "class", label_comparison_fn=coarse
    )
    assert got.metrics == pytest.approx(expected, abs=1e-6)
    if average == "query":  # relevance by coarse class is relevance by the coarse labels alone
        coarse_only = [a[:, 0] if a.ndim == 2 and a.dtype == torch.int64 else a for a in args]
        assert got.metrics == pytest.approx(
            RetrievalEvaluator(names, metric="l2")(*coarse_only).metrics, abs=1e-12
        )


def brute_force(scores: np.ndarray, relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query values over a full ranking by (score desc, index asc); relevant is the (Q, N) matrix."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rel = np.take_along_axis(relevant, order, axis=1)
    r = rel.sum(axis=1)
    first = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, np.inf)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    within_r = np.arange(rel.shape[1])[None, :] < r[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "mrr": 1 / first,
            "mrr@3": np.where(first <= 3, 1 / first, 0.0),
            "map": (precision * rel).sum(axis=1) / r,
            "map@r": (precision * rel * within_r).sum(axis=1) / r,
            "recall@2": rel[:, :2].any(axis=1).astype(float),
        }
    return {k: np.where(r > 0, v, np.nan) for k, v in out.items()}


@pytest.mark.parametrize("no_relevant", ["exclude", "zero"])
def test_class_average_and_custom_relevance_against_brute_force(no_relevant: str) -> None:
    rng = np.random.default_rng(5)
    q = rng.integers(-2, 3, (40, 4)).astype(np.float32)  # integer scores: exact ties
    g = rng.integers(-2, 3, (55, 4)).astype(np.float32)
    ql = np.stack([rng.integers(0, 6, 40), rng.integers(0, 3, 40)], axis=1)
    gl = np.stack([rng.integers(0, 7, 55), rng.integers(0, 3, 55)], axis=1)  # coarse 6 is gallery-only

    def same_coarse_or_both_level_two(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # not an equality
        return (a[..., 0] == b[..., 0]) | ((a[..., 1] == 2) & (b[..., 1] == 2))

    names = ["mrr", "mrr@3", "map", "map@r", "recall@2"]
    evaluator = RetrievalEvaluator(
        names,
        metric="ip",
        average="class",
        no_relevant=no_relevant,
        label_comparison_fn=same_coarse_or_both_level_two,
        return_per_query=True,
        block_size=7,
    )
    result = evaluator(q, ql, g, gl)
    relevant = same_coarse_or_both_level_two(
        torch.from_numpy(ql)[:, None], torch.from_numpy(gl)[None]
    ).numpy()
    expected = brute_force(q.astype(np.float64) @ g.astype(np.float64).T, relevant)
    classes = np.unique(ql, axis=0, return_inverse=True)[1].ravel()
    for name in names:
        np.testing.assert_allclose(result.per_query[name].numpy(), expected[name], atol=1e-12, err_msg=name)
        v = np.nan_to_num(expected[name], nan=0.0) if no_relevant == "zero" else expected[name]
        keep = ~np.isnan(v)
        per_class = [v[keep & (classes == c)].mean() for c in np.unique(classes[keep])]
        assert result[name] == pytest.approx(np.mean(per_class), abs=1e-12), name


def test_custom_relevance_is_streamed_in_blocks(monkeypatch) -> None:
    monkeypatch.setattr(ranks_module, "_LABEL_BUDGET", 64)
    x, y = blobs(40, 5, seed=6)
    labels = hierarchical(y)
    seen: list[tuple[int, int]] = []

    def recording(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = coarse(a, b)
        seen.append(tuple(out.shape))
        return out

    RetrievalEvaluator(["map", "recall@1"], label_comparison_fn=recording, block_size=8)(x, labels)
    assert seen and max(rows * cols for rows, cols in seen) <= 40 * 8  # one gallery block, never 40 x 40
    assert all(cols <= 8 or rows == 1 for rows, cols in seen)


def test_label_comparison_fn_must_return_a_bool_matrix() -> None:
    x, y = blobs(10, 3, seed=7)
    with pytest.raises(TypeError, match="label_comparison_fn must return a bool tensor of shape"):
        RetrievalEvaluator(["recall@1"], label_comparison_fn=lambda a, b: (a == b).float())(x, y)


def test_ami_matches_scikit_learn() -> None:
    rng = np.random.default_rng(8)
    for labels, pred in [
        (rng.integers(0, 7, 300), rng.integers(0, 5, 300)),
        (rng.integers(0, 40, 200), rng.integers(0, 40, 200)),
        (np.arange(10), np.arange(10) + 3),
        (np.zeros(10, int), np.arange(10)),
    ]:
        for average in ("arithmetic", "geometric"):
            expected = adjusted_mutual_info_score(labels, pred, average_method=average)
            assert adjusted_mutual_info(pred, labels, average) == pytest.approx(expected, abs=1e-10)
    x, y = blobs(60, 6, seed=9)
    assignment, _ = kmeans(x, 6)
    result = RetrievalEvaluator(["ami", "nmi"])(x, y)
    assert result["ami"] == pytest.approx(
        adjusted_mutual_info_score(y.numpy(), assignment.numpy()), abs=1e-10
    )


def test_a_registered_metric_is_computed_from_the_same_search(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))  # leave the table as it was afterwards

    def precision_at_k(ranks: RelevantRanks, k: int) -> torch.Tensor:
        hits = (ranks.found & (ranks.ranks <= k)).sum(dim=1).double() / k
        return torch.where(ranks.num_relevant > 0, hits, float("nan"))

    spec = register_metric(
        MetricSpec("precision@K", precision_at_k, "ranks", "k", "relevant among the top K")
    )
    assert spec in list_metrics()
    x = np.random.default_rng(10).integers(-2, 3, (30, 4)).astype(np.float32)
    y = np.arange(30) % 4
    result = RetrievalEvaluator(["precision@5", "recall@1"], metric="ip", return_per_query=True)(x, y)
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(result.per_query["precision@5"].numpy(), (y[order] == y[:, None]).mean(axis=1))
    with pytest.raises(ValueError, match="already registered"):
        register_metric(spec)
    register_metric(MetricSpec("one_number", lambda ranks: ranks.ranks.float().mean(), depth=1))
    with pytest.raises(TypeError, match=r"one_number must give one value per query, shape \(30,\); got \(\)"):
        RetrievalEvaluator(["one_number"])(x, y)


def test_every_built_in_metric_is_in_the_docs_table() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    for spec in list_metrics():
        assert f"| `{spec.name}` |" in doc, spec.name


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"metrics": []}, ValueError, "metrics is empty"),
        ({"metrics": ["recall@0"]}, ValueError, "K must be >= 1"),
        ({"metrics": ["precision@3"]}, ValueError, "unknown metric 'precision@3'"),
        ({"metrics": [1]}, TypeError, "metric names must be strings"),
        ({"block_size": 0}, ValueError, "block_size must be >= 1"),
        ({"block_size": 2.5}, TypeError, "block_size must be an int"),
        ({"kmeans_seed": "1"}, TypeError, "kmeans_seed must be an int"),
        ({"kmeans_seed": -1}, ValueError, "kmeans_seed must be >= 0"),
        ({"average": "label"}, ValueError, "average must be one of"),
        ({"no_relevant": "skip"}, ValueError, "no_relevant must be one of"),
        ({"label_comparison_fn": 3}, TypeError, "label_comparison_fn must be callable"),
        ({"metrics": ["nmi"], "label_comparison_fn": coarse}, ValueError, "compare labels by equality"),
    ],
)
def test_evaluator_rejects_bad_arguments(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        RetrievalEvaluator(**kwargs)


def test_truncated_rankings_refuse_whole_ranking_metrics() -> None:
    ranking = torch.tensor([[1, 2], [0, 2], [0, 1]])
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="map needs every gallery item ranked, but the rankings stop at 1"):
        RetrievalEvaluator(["map"]).from_ranking(ranking[:, :1], labels)
    assert RetrievalEvaluator(["map", "mrr"]).from_ranking(ranking, labels)["mrr"] == 1.0  # whole gallery
    with pytest.raises(TypeError, match="PairwiseScorer protocol"):
        RetrievalEvaluator(["recall@1"]).from_scorer(object(), labels)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: revisited_map([[0, 1]], [{"easy": [0], "hard": [], "junk": []}], kappas=(0,)),
            ValueError,
            r"kappas\[0\] must be >= 1",
        ),
        (
            lambda: revisited_map([[0, 1]], [{"easy": [0], "hard": [], "junk": []}], kappas=(1, -5)),
            ValueError,
            r"kappas\[1\] must be >= 1",
        ),
        (
            lambda: revisited_map([[0, 1]], [{"easy": [0], "hard": [], "junk": []}], kappas=(1.5,)),
            TypeError,
            r"kappas\[0\] must be an int",
        ),
        (lambda: mean_average_precision([[0, 1]], [[0]], kappas=5), TypeError, "kappas must be a sequence"),
        (lambda: gldv2_map([[0, 1]], [[0]], depth=0), ValueError, "depth must be >= 1"),
        (lambda: gldv2_map([[0, 1]], [[0]], depth=1.0), TypeError, "depth must be an int"),
        (
            lambda: gldv2_map([[0, 1], [1, 0]], [[0], [1]], num_private=0),
            ValueError,
            "num_private must be >= 1",
        ),
        (
            lambda: gldv2_map([[0, 1], [1, 0]], [[0], [1]], num_private=2),
            ValueError,
            r"num_private must be in \(0, 2\)",
        ),
        (lambda: kmeans(torch.randn(10, 2), 2, niter=0), ValueError, "niter must be >= 1"),
        (lambda: kmeans(torch.randn(10, 2), 2, seed=0.5), TypeError, "seed must be an int"),
        (lambda: register_metric(MetricSpec("Bad Name", len)), ValueError, "name must be lower-case"),
        (lambda: MetricSpec("hits", len, "ranks", "k"), ValueError, "depth='k' needs a name ending in '@K'"),
        (
            lambda: MetricSpec("hits@K", len, "ranks", 0),
            ValueError,
            "depth must be 'k', 'r', 'all' or an int",
        ),
        (lambda: MetricSpec("hits@K", len, "pairs"), ValueError, "needs must be one of"),
        (lambda: MetricSpec("hits@K", 3), TypeError, "fn must be callable"),
    ],
)
def test_metric_functions_reject_bad_arguments(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_exhaustive_ranks_reuse_the_callers_counts() -> None:
    x, y = blobs(20, 4, seed=11)
    counts = torch.bincount(y, minlength=4)[y] - 1
    ranks = ranks_exhaustive(
        x, y, x, y, metric="cosine", exclude=torch.arange(20), device=torch.device("cpu"), num_relevant=counts
    )
    assert torch.equal(ranks.num_relevant, counts)
    assert torch.equal((ranks.ranks > 0).sum(dim=1), counts)
