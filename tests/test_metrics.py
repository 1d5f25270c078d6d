"""Retrieval and clustering metrics against independent brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from objretrieval.metrics import (
    RetrievalEvaluator,
    average_recall_at_k,
    gldv2_map,
    mean_average_precision,
    normalized_mutual_info,
    pairwise_f1,
    ranks_exhaustive,
    revisited_map,
)

RANKING_METRICS = ["recall@1", "recall@3", "recall@8", "precision@1", "r_precision", "map@r", "map", "map@5"]


def reference_per_query(
    queries: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray, leave_one_out: bool
) -> dict[str, np.ndarray]:
    """Textbook definitions over a full float64 ranking ordered by (score desc, index asc)."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    out: dict[str, list[float]] = {m: [] for m in RANKING_METRICS}
    for q in range(len(queries)):
        order = np.lexsort((np.arange(len(gallery)), -scores[q]))
        if leave_one_out:
            order = order[order != q]
        rel = g_labels[order] == q_labels[q]
        r = int(rel.sum())
        if r == 0:
            for m in out:
                out[m].append(math.nan)
            continue
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        for k in (1, 3, 8):
            out[f"recall@{k}"].append(float(rel[:k].any()))
        out["precision@1"].append(float(rel[0]))
        out["r_precision"].append(rel[:r].sum() / r)
        out["map@r"].append((precision[:r] * rel[:r]).sum() / r)
        out["map"].append((precision * rel).sum() / r)
        out["map@5"].append((precision[:5] * rel[:5]).sum() / min(r, 5))
    return {m: np.array(v) for m, v in out.items()}


def clustered_integer_data(num_classes: int, sizes: tuple[int, ...], dim: int, seed: int):
    """Small-integer embeddings around class centres: exact scores, plenty of ties, varied class sizes."""
    rng = np.random.default_rng(seed)
    counts = rng.choice(sizes, num_classes)
    labels = np.repeat(np.arange(num_classes) * 7 + 3, counts)  # non-contiguous label values
    centres = rng.integers(-2, 3, (num_classes, dim))
    x = np.repeat(centres, counts, axis=0) + rng.integers(-1, 2, (len(labels), dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm].astype(np.int64)


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_ranking_metrics_match_textbook_definitions(leave_one_out: bool) -> None:
    x, y = clustered_integer_data(25, (1, 2, 3, 6, 9), 8, seed=0)  # includes single-sample classes
    if leave_one_out:
        args, ref = (x, y), reference_per_query(x, y, x, y, True)
    else:
        g, gl = clustered_integer_data(25, (2, 5), 8, seed=1)
        args, ref = (x, y, g, gl), reference_per_query(x, y, g, gl, False)
    result = RetrievalEvaluator(RANKING_METRICS, metric="ip", return_per_query=True, block_size=17)(*args)
    for name in RANKING_METRICS:
        np.testing.assert_allclose(result.per_query[name].numpy(), ref[name], atol=1e-12, err_msg=name)
        np.testing.assert_allclose(result[name], np.nanmean(ref[name]), atol=1e-12, err_msg=name)
    assert result.num_without_relevant == int(np.isnan(ref["map"]).sum())
    assert (result.num_without_relevant > 0) == leave_one_out


def test_from_ranking_agrees_with_embeddings() -> None:
    x, y = clustered_integer_data(20, (2, 4, 5), 6, seed=2)
    evaluator = RetrievalEvaluator(
        ["recall@1", "recall@4", "r_precision", "map@r", "precision@1"], metric="ip"
    )
    from_embeddings = evaluator(x, y)
    orders = [np.lexsort((np.arange(len(x)), -(x @ x[q]).astype(np.float64))) for q in range(len(x))]
    ranking = np.stack([order[order != q] for q, order in enumerate(orders)])
    from_ranking = evaluator.from_ranking(ranking[:, :10], y)  # leave-one-out: gallery_labels omitted
    assert from_ranking.metrics == pytest.approx(from_embeddings.metrics, abs=1e-12)


def test_no_relevant_policy() -> None:
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])  # class 1 has a single sample: undefined under leave-one-out
    excluded = RetrievalEvaluator(["recall@1", "map@r"])(x, y)
    assert excluded["recall@1"] == 1.0 and excluded["map@r"] == 1.0
    assert excluded.num_without_relevant == 1
    zero = RetrievalEvaluator(["recall@1", "map@r"], no_relevant="zero")(x, y)
    assert zero["recall@1"] == pytest.approx(2 / 3) and zero["map@r"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1 queries have no relevant item"):
        RetrievalEvaluator(["recall@1"], no_relevant="error")(x, y)


def test_labels_above_float32_precision_stay_distinct() -> None:
    big = 2**24  # float32 cannot tell 2**24 from 2**24 + 1
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    y = torch.tensor([big, big + 1, big + 1, big])
    result = RetrievalEvaluator(["precision@1"])(x, y)
    assert result["precision@1"] == 0.0  # each nearest neighbour belongs to the other class


def test_exhaustive_map_ties_rank_the_lower_index_first() -> None:
    # Query 0 ties with every other item; positives at indices 3 and 5 rank 3rd and 5th (self excluded).
    x = torch.ones(6, 2)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    result = RetrievalEvaluator(["map"], return_per_query=True)(x, y)
    assert result.per_query["map"][0].item() == pytest.approx((1 / 3 + 2 / 5) / 2)


def test_iterable_gallery_with_the_wrong_number_of_labels_is_rejected() -> None:
    g = torch.randn(30, 4)
    with pytest.raises(ValueError, match="gallery_labels has 29 entries but the gallery has 30 rows"):
        RetrievalEvaluator(["recall@1"])(
            g[:5], torch.zeros(5, dtype=torch.long), iter([g[:10], g[10:]]), torch.zeros(29, dtype=torch.long)
        )


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            (torch.randn(5, 3), torch.zeros(4, dtype=torch.long)),
            {},
            r"query_labels has 4 entries, expected 5",
        ),
        ((torch.randn(5, 3), torch.zeros(5)), {}, "query_labels must have an integer dtype"),
        (
            (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(4, 3)),
            {},
            "gallery given without",
        ),
        (
            (torch.randn(5, 3), torch.zeros(5, dtype=torch.long), None, torch.zeros(5, dtype=torch.long)),
            {},
            "gallery_labels given without a gallery",
        ),
        (
            (
                torch.randn(5, 3),
                torch.zeros(5, dtype=torch.long),
                torch.randn(4, 3),
                torch.zeros(3, dtype=torch.long),
            ),
            {},
            "gallery_labels has 3 entries, expected 4",
        ),
        ((torch.full((5, 3), float("nan")), torch.zeros(5, dtype=torch.long)), {}, "queries contains NaN"),
        ((torch.randn(5, 3), torch.zeros(5, dtype=torch.long)), {"metrics": ["recall@5"]}, "k=5 is larger"),
        (
            (
                torch.randn(5, 3),
                torch.zeros(5, dtype=torch.long),
                torch.empty(0, 3),
                torch.zeros(0, dtype=torch.long),
            ),
            {},
            "gallery is empty",
        ),
    ],
)
def test_evaluator_rejects_bad_input(args, kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        RetrievalEvaluator(**kwargs)(*args)


@pytest.mark.parametrize(
    ("ranking", "labels", "gallery_labels", "metrics", "message"),
    [
        ([[1, 5]], [0], [0, 1], ["recall@1"], r"ids outside \[-1, 2\)"),
        ([[1, 1]], [0], [0, 1], ["recall@1"], "lists a gallery id more than once"),
        ([[1], [1]], [0, 0], None, ["recall@1"], "contains query 1 itself"),
        ([[1], [0]], [0, 0], None, ["recall@2"], "recall@2 needs rankings at least 2 deep"),
        ([[1.0]], [0], [0, 1], ["recall@1"], "ranking must hold integer ids"),
        ([[1]], [0], [0, 1], ["nmi"], "cluster the embeddings"),
    ],
)
def test_from_ranking_rejects_bad_rankings(ranking, labels, gallery_labels, metrics, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        RetrievalEvaluator(metrics).from_ranking(
            torch.tensor(ranking),
            torch.tensor(labels),
            None if gallery_labels is None else torch.tensor(gallery_labels),
        )


def test_unknown_metric_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metric 'recall@top'"):
        RetrievalEvaluator(["recall@top"])


def test_nmi_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 7, 200), rng.integers(0, 5, 200)),
        (np.zeros(10, int), np.zeros(10, int)),
        (np.arange(10), np.zeros(10, int)),
        (np.arange(10), np.arange(10) + 100),
    ]
    for labels, pred in cases:
        for average in ("arithmetic", "geometric"):
            expected = normalized_mutual_info_score(labels, pred, average_method=average)
            assert normalized_mutual_info(pred, labels, average) == pytest.approx(expected, abs=1e-12)


def test_pairwise_f1_counts_pairs() -> None:
    rng = np.random.default_rng(1)
    labels, pred = rng.integers(0, 4, 40), rng.integers(0, 6, 40)
    pairs = list(itertools.combinations(range(40), 2))
    same_class = {p for p in pairs if labels[p[0]] == labels[p[1]]}
    same_cluster = {p for p in pairs if pred[p[0]] == pred[p[1]]}
    precision = len(same_class & same_cluster) / len(same_cluster)
    recall = len(same_class & same_cluster) / len(same_class)
    assert pairwise_f1(pred, labels) == pytest.approx(
        2 * precision * recall / (precision + recall), abs=1e-12
    )
    assert pairwise_f1(np.arange(5), np.arange(5)) == 1.0
    with pytest.raises(ValueError, match="pred has 3 entries, expected 5"):
        pairwise_f1(np.arange(3), np.arange(5))


def test_revisited_protocol_by_hand() -> None:
    ranking = [[9, 1, 4, 2, 7, 3]]
    gnd = [{"easy": [2], "hard": [3], "junk": [1]}]
    result = revisited_map(ranking, gnd, kappas=(1, 3))
    # Medium: relevant {2, 3}, junk {1} removed -> 0-based ranks r = 2 and 4. Trapezoid j-th item:
    # (j / r + (j + 1) / (r + 1)) / 2, i.e. (0/2 + 1/3)/2 and (1/4 + 2/5)/2, over 2 relevant items.
    assert result.medium.map == pytest.approx(((0 + 1 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2)
    # Easy: relevant {2}, junk {1, 3} -> r = 2. Hard: relevant {3}, junk {1, 2} -> r = 3.
    assert result.easy.map == pytest.approx((0 + 1 / 3) / 2)
    assert result.hard.map == pytest.approx((0 + 1 / 4) / 2)
    # a relevant item ranked first (r = 0) counts precision 1 on both sides of the trapezoid
    assert revisited_map([[2, 3]], gnd).easy.map == pytest.approx(1.0)
    # mP@k: 1-based positions {3, 5}; k=1 -> kq=1 -> 0; k=3 -> 1/3
    assert result.medium.mean_precision.tolist() == pytest.approx([0.0, 1 / 3])


def test_queries_without_positives_are_skipped_and_unretrieved_positives_count_zero() -> None:
    ranking = [[0, 1], [0, 1], [2, 3]]
    positives = [[1], [], [7]]
    result = mean_average_precision(ranking, positives, kappas=(1,))
    assert math.isnan(result.ap[1].item()) and result.ap[2].item() == 0.0
    assert result.map == pytest.approx(((0 / 1 + 1 / 2) / 2 + 0.0) / 2)
    assert result.mean_precision.tolist() == pytest.approx([0.0])
    with pytest.raises(ValueError, match="positives has 1 entries but the ranking has 3 queries"):
        mean_average_precision(ranking, [[1]])
    with pytest.raises(ValueError, match="negative ids"):
        mean_average_precision([[-1, 0]], [[0]])


def test_gldv2_map_at_100() -> None:
    rng = np.random.default_rng(2)
    ranking = np.stack([rng.permutation(300) for _ in range(10)])
    positives = [list(rng.choice(300, size=n, replace=False)) for n in rng.integers(1, 150, 10)]
    result = gldv2_map(ranking, positives, num_private=4)
    expected = []
    for row, pos in zip(ranking, positives, strict=True):
        rel = np.isin(row[:100], pos)
        precision = np.cumsum(rel) / np.arange(1, 101)
        expected.append((precision * rel).sum() / min(len(pos), 100))
    assert result.map == pytest.approx(np.mean(expected))
    assert result.public == pytest.approx(np.mean(expected[:6]))
    assert result.private == pytest.approx(np.mean(expected[6:]))


def test_average_recall_takes_the_best_query_per_rank() -> None:
    gallery_labels = torch.tensor([0, 1, 2, 3])
    # class 0 has two query rows; at rank 1 row 0 is more confident (wrong item), at rank 2 row 1 (right item)
    indices = torch.tensor([[1, 2], [3, 0], [2, 1]])
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.4], [0.7, 0.6]])
    query_labels = torch.tensor([0, 0, 2])
    result = average_recall_at_k(scores, indices, query_labels, gallery_labels)
    # class 0: rank1 -> row 0 -> item 1 (miss); rank2 -> row 1 -> item 0 (hit). class 2: hit at rank 1.
    assert result.recalls.tolist() == [0.5, 1.0]
    assert result.mean == 0.75
    with pytest.raises(ValueError, match="scores are needed"):
        average_recall_at_k(None, indices, query_labels, gallery_labels)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluator_on_cuda_matches_cpu() -> None:
    x, y = clustered_integer_data(30, (2, 5, 8), 8, seed=3)
    metrics = ["recall@1", "recall@4", "r_precision", "map@r", "map"]
    cpu = RetrievalEvaluator(metrics, metric="ip")(x, y)
    gpu = RetrievalEvaluator(metrics, metric="ip", device="cuda")(
        torch.from_numpy(x).cuda(), torch.from_numpy(y)
    )
    assert gpu.metrics == pytest.approx(cpu.metrics, abs=1e-12)


# --- exhaustive ranks: block boundaries (issue 12: > 1024 queries raised a size mismatch) -------------------


def brute_force_ranks(
    queries: np.ndarray, q_labels: np.ndarray, gallery: np.ndarray, g_labels: np.ndarray, leave_one_out: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(order, relevant): full float64 ranking by (score desc, index asc) and the relevance along it."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if leave_one_out:
        np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")  # stable: ties keep the lower index first
    if leave_one_out:
        order = order[:, :-1]  # the query itself, ranked last at -inf
    return order, g_labels[order] == q_labels[:, None]


def brute_force_ap(relevant: np.ndarray) -> np.ndarray:
    r = relevant.sum(axis=1)
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, (precision * relevant).sum(axis=1) / r, np.nan)


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize(
    ("num_queries", "block_size", "query_block_size"), [(37, 5, 6), (50, 13, 7), (1, 3, 1)]
)
def test_exhaustive_ranks_at_odd_block_boundaries(
    leave_one_out, num_queries, block_size, query_block_size
) -> None:
    x, y = clustered_integer_data(12, (1, 3, 4, 7), 4, seed=num_queries)
    q, ql = x[:num_queries], y[:num_queries]
    g, gl = (q, ql) if leave_one_out else (x[::-1].copy(), y[::-1].copy())
    exclude = torch.arange(len(q)) if leave_one_out else None
    ranks = ranks_exhaustive(
        torch.from_numpy(q),
        torch.from_numpy(ql),
        torch.from_numpy(g),
        torch.from_numpy(gl),
        metric="ip",
        exclude=exclude,
        device=torch.device("cpu"),
        block_size=block_size,
        query_block_size=query_block_size,
    )
    _, relevant = brute_force_ranks(q, ql, g, gl, leave_one_out)
    for i in range(len(q)):
        expected = np.flatnonzero(relevant[i]) + 1
        assert ranks.ranks[i][ranks.ranks[i] > 0].tolist() == expected.tolist()
        assert int(ranks.num_relevant[i]) == len(expected)


@pytest.mark.parametrize(("num_queries", "leave_one_out"), [(1025, True), (1100, True), (1025, False)])
def test_map_beyond_one_query_block(num_queries: int, leave_one_out: bool) -> None:
    rng = np.random.default_rng(num_queries)
    q = rng.integers(-2, 3, (num_queries, 3)).astype(np.float32)  # integer scores: exact, many ties
    ql = rng.integers(0, 40, num_queries)
    args = (q, ql) if leave_one_out else (q, ql, q[:301], ql[:301])
    g, gl = (q, ql) if leave_one_out else (q[:301], ql[:301])
    result = RetrievalEvaluator(["map", "recall@2"], metric="ip", return_per_query=True)(*args)
    _, relevant = brute_force_ranks(q, ql, g, gl, leave_one_out)
    np.testing.assert_allclose(result.per_query["map"].numpy(), brute_force_ap(relevant), atol=1e-12)
    np.testing.assert_allclose(result["map"], np.nanmean(brute_force_ap(relevant)), atol=1e-12)


@pytest.mark.parametrize("label_comparison_fn", [None, lambda a, b: a[..., 0] == b[..., 0]])
def test_an_empty_gallery_is_refused_by_name(label_comparison_fn) -> None:
    rows = () if label_comparison_fn is None else (2,)
    evaluator = RetrievalEvaluator(["recall@1"], label_comparison_fn=label_comparison_fn)
    with pytest.raises(ValueError, match="gallery_labels is empty"):
        evaluator.from_ranking(
            torch.full((3, 1), -1),
            torch.zeros(3, *rows, dtype=torch.long),
            torch.zeros(0, *rows, dtype=torch.long),
        )
