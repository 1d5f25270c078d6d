"""The reranking pipeline: shortlist handling, score fusion, the revisited sweep, with hand-worked examples."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from objretrieval.reranking import (
    AMES_FUSION,
    PairwiseScorer,
    Shortlist,
    fuse,
    rerank,
    rerank_revisited,
    score_shortlist,
    score_table,
)
from objretrieval.search import knn


def _shortlist(scores: list[list[float]], ids: list[list[int]]) -> Shortlist:
    return Shortlist(torch.tensor(scores), torch.tensor(ids))


def test_fuse_formula() -> None:
    g, raw = torch.tensor([0.8, 0.2]), torch.tensor([2.0, -1.0])
    expected = [0.3 * 0.8 + 0.7 / (1 + math.exp(-1.0)), 0.3 * 0.2 + 0.7 / (1 + math.exp(0.5))]
    torch.testing.assert_close(fuse(g, raw, lamb=0.3, temp=0.5), torch.tensor(expected))


def test_rerank_resorts_the_top_k_and_keeps_the_rest() -> None:
    shortlist = _shortlist([[0.9, 0.8, 0.7, 0.6]], [[10, 11, 12, 13]])
    raw = torch.tensor([[-10.0, 10.0, 0.0, 50.0]])
    # lamb 0.5, temp 1: fused 0.45 + ~0, 0.40 + ~0.5, 0.35 + 0.25 -> 11, 12, 10; 13 lies beyond k = 3
    assert rerank(shortlist, raw, k=3, lamb=0.5, temp=1.0).tolist() == [[11, 12, 10, 13]]
    # with k = 4, 13 fuses to 0.30 + 0.5 = 0.80: after 11 (0.90), before 12 (0.60)
    assert rerank(shortlist, raw, k=4, lamb=0.5, temp=1.0).tolist() == [[11, 13, 12, 10]]
    assert rerank(shortlist, raw, k=4, lamb=1.0, temp=1.0).tolist() == [[10, 11, 12, 13]]  # global only


def test_rerank_ties_keep_the_global_order() -> None:
    shortlist = _shortlist([[0.5, 0.5, 0.5]], [[3, 1, 2]])
    assert rerank(shortlist, torch.zeros(1, 3), k=3, lamb=0.5, temp=1.0).tolist() == [[3, 1, 2]]


def test_move_to_end_keeps_relative_order() -> None:
    shortlist = _shortlist(
        [[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, 0.5]], [[4, 0, 3, 1, 2], [0, 1, 2, 3, 4]]
    )
    moved = shortlist.move_to_end([[0, 1], []])
    assert moved.indices.tolist() == [[4, 3, 2, 0, 1], [0, 1, 2, 3, 4]]
    torch.testing.assert_close(moved.scores[0], torch.tensor([0.9, 0.7, 0.5, 0.8, 0.6]))
    with pytest.raises(ValueError, match="id lists for 1 queries, the shortlist has 2"):
        shortlist.move_to_end([[0]])


def test_official_shortlist_layout() -> None:
    cache = np.stack([np.array([[0.9, 0.4]]), np.array([[7.0, 2.0]])])  # (2, Q, K): similarities, then ids
    shortlist = Shortlist.from_official(cache)
    assert shortlist.indices.dtype == torch.int64 and shortlist.indices.tolist() == [[7, 2]]
    with pytest.raises(ValueError, match=r"cache_nn must be \(2, num_queries, K\)"):
        Shortlist.from_official(np.zeros((3, 1, 2)))
    with pytest.raises(ValueError, match=r"scores and indices must both be \(Q, K\)"):
        Shortlist(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))


def test_score_shortlist_and_errors() -> None:
    table = torch.arange(12.0).reshape(2, 6)
    shortlist = _shortlist([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]], [[5, 0, 2], [1, 4, 3]])
    assert score_shortlist(score_table(table), shortlist, k=2).tolist() == [[5.0, 0.0], [7.0, 10.0]]
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        score_shortlist(score_table(table), shortlist, k=4)
    with pytest.raises(ValueError, match=r"raw must be \(Q, >= 3\) with Q = 2"):
        rerank(shortlist, torch.zeros(2, 2), k=3, lamb=0.5, temp=1.0)


def test_revisited_sweep_applies_junk_handling_and_reports_the_best_combination() -> None:
    # one query; database 0..5 in global order; easy {3}, hard {4}, junk {1}
    gnd = [{"easy": [3], "hard": [4], "junk": [1]}]
    shortlist = _shortlist([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]], [[0, 1, 2, 3, 4, 5]])
    raw = torch.tensor([[0.0, 20.0, 0.0, 10.0, 9.0, 0.0]])  # the pairwise model loves the junk image 1
    result = rerank_revisited(score_table(raw), shortlist, gnd, top_k=(5,), lamb=(0.0, 1.0), temp=(1.0,))
    pairwise_only, global_only = result.combinations
    # Medium: junk moved out of the top 5 -> [0, 2, 3, 4, 5 | 1]; pairwise scores put 3 and 4 first
    assert pairwise_only.rankings["medium"].tolist() == [[3, 4, 0, 2, 5, 1]]
    assert pairwise_only.medium_map == pytest.approx(1.0)
    # Hard: junk and easy moved out -> [0, 2, 4, 5, 1 | 3]; image 1 is reranked (within k) but ignored as junk
    assert pairwise_only.rankings["hard"].tolist() == [[1, 4, 0, 2, 5, 3]]
    assert pairwise_only.hard_map == pytest.approx(1.0)
    # global order: Medium positives at 0-based ranks 2 and 3 once junk is ignored, Hard positive at rank 2;
    # the official AP averages precision before and at each positive (trapezoid): (j / r + (j + 1) / (r + 1)) / 2
    assert global_only.medium_map == pytest.approx(((0 / 2 + 1 / 3) / 2 + (1 / 3 + 2 / 4) / 2) / 2)
    assert global_only.hard_map == pytest.approx((0 / 2 + 1 / 3) / 2)
    assert result.best is pairwise_only  # the best, not the last, combination
    assert "best: k=5 lamb=0.0 temp=1.0" in result.summary()
    assert result.raw["medium"].shape == (1, 5)
    with pytest.raises(ValueError, match="gnd has 2 queries but the shortlist has 1"):
        rerank_revisited(score_table(raw), shortlist, gnd * 2)


def test_fusion_defaults_come_from_the_builders() -> None:
    from objretrieval import create_model, list_models
    from objretrieval.models import AMES
    from objretrieval.reranking import AMESScorer

    ames_models = {name for name in list_models() if name.endswith(("_ames", "_ames_dist"))}
    assert set(AMES_FUSION) == ames_models
    # the authors' values (lamb, temp) per model, and the official configuration's default otherwise
    assert create_model("dinov2_ames").fusion == (0.55, 0.30)
    assert create_model("dinov2_ames_dist").fusion == (0.35, 0.10)
    assert create_model("cvnet_ames").fusion == (0.85, 0.80)
    assert create_model("cvnet_ames_dist").fusion == (0.65, 0.20)
    assert AMES(16).fusion == (0.5, 0.5)

    gnd = [{"easy": [0], "hard": [], "junk": []}]
    shortlist = _shortlist([[0.9, 0.8]], [[1, 0]])
    model = AMES(16, model_dim=16, num_encoder_layers=1, dim_feedforward=16, fusion=(0.2, 0.7))
    queries = (torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.bool))
    database = (torch.randn(2, 3, 16), torch.zeros(2, 3, dtype=torch.bool))
    result = rerank_revisited(AMESScorer(model, queries, database), shortlist, gnd, top_k=(2,))
    assert [(c.lamb, c.temp) for c in result.combinations] == [(0.2, 0.7)]
    result = rerank_revisited(score_table(torch.zeros(1, 2)), shortlist, gnd, top_k=(2,))
    assert [(c.lamb, c.temp) for c in result.combinations] == [(0.5, 0.5)]


# -- shortlists from a search, missing entries, argument checks ----------------------------------------------


def test_neighbors_from_a_search_are_a_shortlist() -> None:
    g = torch.Generator().manual_seed(0)
    queries, database = torch.randn(4, 8, generator=g), torch.randn(20, 8, generator=g)
    neighbours = knn(queries, database, k=6)
    raw = torch.randn(4, 20, generator=g)
    table = score_table(raw)
    assert isinstance(table, PairwiseScorer)
    as_shortlist = Shortlist(*neighbours)
    assert torch.equal(score_shortlist(table, neighbours, k=6), score_shortlist(table, as_shortlist, k=6))
    ranking = rerank(neighbours, score_shortlist(table, neighbours, k=6), k=6, lamb=0.0, temp=1.0)
    # lamb = 0: the pairwise scores alone order the shortlist (brute force from the table)
    expected = neighbours.indices.gather(1, raw.gather(1, neighbours.indices).argsort(1, descending=True))
    assert torch.equal(ranking, expected)
    gnd = [{"easy": [int(i) for i in neighbours.indices[q, :2]], "hard": [], "junk": []} for q in range(4)]
    assert rerank_revisited(table, neighbours, gnd, top_k=(6,)).missing == 0
    with pytest.raises(ValueError, match="shortlist scores must be descending"):
        rerank(knn(queries, database, k=6, metric="l2"), torch.zeros(4, 6), k=6, lamb=0.5, temp=1.0)


def test_missing_entries_are_not_scored_and_rank_last() -> None:
    # query 0 found 2 of 4 neighbours (faiss marks the rest -1, score -inf); query 1 has one missing in the middle
    shortlist = _shortlist(
        [[0.9, 0.8, float("-inf"), float("-inf")], [0.9, -3.0e38, 0.7, 0.6]], [[3, 1, -1, -1], [0, -1, 2, 4]]
    )
    assert shortlist.indices.tolist() == [[3, 1, -1, -1], [0, 2, 4, -1]]  # missing moved behind real ones
    assert shortlist.num_missing == 3
    table = torch.zeros(2, 5)
    table[:, 4] = 100.0  # the last database item: what index -1 would read if it were scored
    table[0, 1], table[1, 2] = 5.0, 5.0
    with pytest.warns(UserWarning, match="2 of the first 4 shortlist entries per query are missing"):
        raw = score_shortlist(
            score_table(table[:1]), Shortlist(shortlist.scores[:1], shortlist.indices[:1]), 4
        )
    assert raw[0, :2].tolist() == [0.0, 5.0] and bool(raw[0, 2:].isnan().all())
    with pytest.warns(UserWarning, match="missing"):
        raw = score_shortlist(score_table(table), shortlist, k=4)
    for lamb in (0.0, 0.5, 1.0):
        ranking = rerank(shortlist, raw, k=4, lamb=lamb, temp=1.0)
        assert ranking[0, 2:].tolist() == [-1, -1] and ranking[1, 3] == -1
        assert sorted(ranking[0, :2].tolist()) == [1, 3] and sorted(ranking[1, :3].tolist()) == [0, 2, 4]
    assert rerank(shortlist, raw, k=4, lamb=0.0, temp=1.0).tolist() == [[1, 3, -1, -1], [4, 2, 0, -1]]
    gnd = [{"easy": [1], "hard": [], "junk": [3]}, {"easy": [4], "hard": [], "junk": []}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rerank_revisited(score_table(table), shortlist, gnd, top_k=(4,), lamb=(0.0,), temp=(1.0,))
    (only,) = result.combinations
    assert only.rankings["medium"].tolist() == [[1, 3, -1, -1], [4, 2, 0, -1]]  # junk 3 after 1, before -1
    assert result.missing == 3 and "3 missing shortlist entries" in result.summary()
    assert only.medium_map == pytest.approx(1.0)


def test_shortlist_and_fusion_argument_errors() -> None:
    shortlist = _shortlist([[0.9, 0.8, 0.7]], [[0, 1, 2]])
    raw = torch.zeros(1, 3)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            rerank(shortlist, raw, k=k, lamb=0.5, temp=1.0)
    with pytest.raises(TypeError, match="k must be an int"):
        rerank(shortlist, raw, k=2.0, lamb=0.5, temp=1.0)  # type: ignore[arg-type]
    for lamb in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lamb must"):
            rerank(shortlist, raw, k=3, lamb=lamb, temp=1.0)
    for temp in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"temp must lie in \(0, inf\)"):
            fuse(shortlist.scores, raw, lamb=0.5, temp=temp)
    with pytest.raises(ValueError, match="raw contains NaN or inf"):
        rerank(shortlist, torch.tensor([[0.0, float("nan"), 0.0]]), k=3, lamb=0.5, temp=1.0)
    with pytest.raises(
        ValueError, match=r"scores must be descending along each row.*row 1 has 0.5 before 0.7"
    ):
        _shortlist([[0.9, 0.8, 0.7], [0.9, 0.5, 0.7]], [[0, 1, 2], [0, 1, 2]])
    _shortlist([[0.9, float("nan")]], [[0, -1]])  # a missing entry's score does not matter
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        _shortlist([[0.9, float("nan")]], [[0, 1]])
    with pytest.raises(ValueError, match="indices must be database ids >= 0, or -1"):
        _shortlist([[0.9, 0.8]], [[0, -2]])
    with pytest.raises(TypeError, match="indices must hold integer database ids"):
        Shortlist(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(TypeError, match="shortlist must be a Shortlist"):
        rerank(torch.zeros(1, 3), raw, k=3, lamb=0.5, temp=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the scorer has 2 queries but the shortlist 1 rows"):
        score_shortlist(score_table(torch.zeros(2, 3)), shortlist, k=2)


def test_an_approximate_faiss_shortlist_keeps_its_missing_entries_last() -> None:
    pytest.importorskip("faiss")
    from objretrieval.search import FaissOptions

    g = torch.Generator().manual_seed(0)
    database, queries = torch.randn(200, 8, generator=g), torch.randn(5, 8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # knn warns about the missing entries; asserted below instead
        neighbours = knn(queries, database, k=50, backend="faiss", faiss=FaissOptions("IVF16,Flat", nprobe=1))
    assert neighbours.num_missing > 0  # one probed list holds fewer than 50 items
    table = torch.rand(5, 200, generator=g)
    table[:, -1] = 10.0  # what a missing entry (-1) would score if it were read as the last item
    with pytest.warns(UserWarning, match="missing"):
        raw = score_shortlist(score_table(table), neighbours, k=50)
    ranking = rerank(neighbours, raw, k=50, lamb=0.0, temp=1.0)
    for q, (row, found) in enumerate(zip(ranking, neighbours.indices, strict=True)):
        real = found[found >= 0]
        assert torch.equal(row[len(real) :], torch.full((50 - len(real),), -1))  # missing: last, still -1
        assert torch.equal(row[: len(real)], real[table[q, real].argsort(descending=True)])  # lamb = 0


def test_database_cache_refuses_a_non_bool_keep_mask() -> None:
    from objretrieval.reranking import DatabaseCache

    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        DatabaseCache(torch.ones(3, 4, dtype=torch.uint8), tokens=torch.zeros(3, 4, 8, dtype=torch.float16))
