"""The retrieval pipelines sharded over real gloo processes: descriptor extraction into per-rank shards read as
one store, AMES reranking and AVSL evaluation with their scoring shared out, each identical to one process."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist

from objretrieval import RetrievalEvaluator, knn
from objretrieval.descriptors import HEADER, DescriptorStore, split_rows
from objretrieval.distributed.world import shard_range
from objretrieval.models import AMES, AttributableSimilarity, AVSLFeatures, AVSLScorer
from objretrieval.reranking import (
    AMESScorer,
    DatabaseCache,
    TableScorer,
    rerank,
    rerank_revisited,
    score_shortlist,
)
from objretrieval.search import pairwise_knn
from objretrieval.search.pairwise import score_candidates
from tests.spawn import run_world

NUM_QUERIES, NUM_DATABASE, TOPK, DIM = 5, 11, 6, 8
METRICS = ["recall@1", "recall@2", "map@r", "precision@1"]


def _rows(n: int, seed: int) -> torch.Tensor:
    """(n, TOPK, HEADER + DIM) descriptor rows, image i with its last i % 3 rows padding (zero but the flag)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, TOPK, HEADER + DIM)
    rows[..., HEADER:] = torch.randn(n, TOPK, DIM, generator=g)
    rows[..., 4] = torch.rand(n, TOPK, generator=g)  # weight
    for i in range(n):
        if i % 3:
            rows[i, TOPK - i % 3 :] = 0.0
            rows[i, TOPK - i % 3 :, 3] = 1.0  # pad flag
    return rows


def _extract_shard(folder: Path, name: str, rows: torch.Tensor, world: int) -> list[str]:
    """Write this rank's shard of ``rows`` (as an extraction loop would, image by image); all shard paths."""
    images = shard_range(len(rows))
    with DescriptorStore.create(
        folder / f"{name}.{dist.get_rank()}.h5", len(rows), TOPK, DIM, shard=images
    ) as s:
        for position, image in enumerate(s.images):
            s.write(position, rows[image][None])
    dist.barrier()  # every shard written before anyone reads them
    return [str(folder / f"{name}.{r}.h5") for r in range(world)]


def _all_ids(n: int) -> torch.Tensor:
    return torch.arange(n).expand(n, n)


def _ames() -> AMES:
    torch.manual_seed(0)  # the same random weights in every process
    return AMES(DIM, model_dim=16, nhead=2, num_encoder_layers=1, dim_feedforward=32).eval()


def _avsl() -> tuple[AttributableSimilarity, AVSLFeatures, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sim = AttributableSimilarity(8, num_levels=3, topk=3)
    with torch.no_grad():
        sim.links.copy_(torch.rand(sim.links.shape, generator=g))
        sim.num_link_updates.fill_(1)
        sim.reliability_scale.copy_(torch.randn(sim.reliability_scale.shape, generator=g))
    n = 9
    feats = AVSLFeatures(
        tuple(torch.randn(n, 8, generator=g) for _ in range(3)),
        tuple(0.05 + 0.1 * torch.rand(n, 8, generator=g) for _ in range(3)),
    )
    return sim, feats, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])


def _pipelines(rank: int, world: int, folder: str) -> dict:
    """Every pipeline sharded (``group=WORLD``) and in this process alone (``group=None``), on one rank."""
    root, out = Path(folder), {}
    group = dist.group.WORLD
    # 1. extraction: one shard per rank, read back as one store
    query_rows, db_rows = _rows(NUM_QUERIES, 0), _rows(NUM_DATABASE, 1)
    query_paths = _extract_shard(root, "query", query_rows, world)
    db_paths = _extract_shard(root, "db", db_rows, world)
    out["shares"] = {n: shard_range(n) for n in (0, 1, 2, 5, 7)}
    with DescriptorStore.open_shards(db_paths[::-1]) as merged:  # any order
        out["merged_rows"] = merged.read_rows(np.arange(NUM_DATABASE))
        out["merged_images"] = merged.images
        out["merged_picked"] = merged.read_rows([7, 0, 7, 3])
    single_path = root / f"db_single_{rank}.h5"
    with DescriptorStore.create(single_path, NUM_DATABASE, TOPK, DIM) as single:
        single.write(0, db_rows)

    # 2. AMES reranking: the merged stores against a store written by one process
    model = _ames()
    g = torch.Generator().manual_seed(2)
    shortlist = knn(torch.randn(NUM_QUERIES, 4, generator=g), torch.randn(NUM_DATABASE, 4, generator=g), k=6)
    lamb, temp = model.fusion
    with (
        DescriptorStore.open_shards(query_paths) as queries,
        DescriptorStore.open_shards(db_paths) as database,
        DescriptorStore(single_path) as single,
    ):
        cache = DatabaseCache.build(model, database, max_descriptors=TOPK, block_size=4)
        single_cache = DatabaseCache.build(model, single, max_descriptors=TOPK, block_size=4)
        out["cache_equal"] = torch.equal(cache.tokens, single_cache.tokens) and torch.equal(
            cache.keep, single_cache.keep
        )
        scorer = AMESScorer(model, queries, cache, query_descriptors=TOPK, batch_size=3)
        # 4 pairs per call: queries' 6 pairs split across calls and ranks, 8 calls shared 4/4 or 3/3/2
        raw = score_shortlist(scorer, shortlist, k=6, chunk_size=4, group=group)
        single_scorer = AMESScorer(
            model,
            split_rows(query_rows),
            single_cache,
            query_descriptors=TOPK,
            batch_size=3,
        )
        out["raw"], out["raw_single"] = raw, score_shortlist(single_scorer, shortlist, k=6, chunk_size=4)
        out["ranking"] = rerank(shortlist, raw, 6, lamb, temp)
        out["ranking_single"] = rerank(shortlist, out["raw_single"], 6, lamb, temp)
        # straight from the merged stores, without a cache: 3 calls of 12 pairs, shared 2/1 or 1/1/1
        direct = AMESScorer(model, queries, database, query_descriptors=TOPK, database_descriptors=TOPK)
        out["raw_direct"] = score_shortlist(direct, shortlist, k=6, chunk_size=12, group=group)
        out["raw_direct_single"] = score_shortlist(direct, shortlist, k=6, chunk_size=12)
        gnd = [{"easy": [q], "hard": [q + 1], "junk": [q + 2]} for q in range(NUM_QUERIES)]
        revisited = rerank_revisited(scorer, shortlist, gnd, top_k=(3, 6), group=group)
        revisited_single = rerank_revisited(single_scorer, shortlist, gnd, top_k=(3, 6))
        out["revisited_equal"] = all(
            torch.equal(revisited.raw[m], revisited_single.raw[m]) for m in ("medium", "hard")
        ) and [c.medium.summary() for c in revisited.combinations] == [
            c.medium.summary() for c in revisited_single.combinations
        ]
        try:  # ranks with different shortlists are refused on every rank, instead of mixing their scores
            score_candidates(scorer, shortlist.indices.roll(rank, dims=1), group=group)
        except ValueError as e:
            out["mismatch"] = str(e)

    # 3. AVSL evaluation: leave-one-out (symmetric tiles), query/gallery, shortlist rescoring
    sim, feats, labels = _avsl()
    mine = shard_range(len(feats))
    gathered = feats.rows(slice(mine.start, mine.stop)).all_gather(group)  # each rank's share of the features
    out["features_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(
            gathered.embeddings + gathered.certainties, feats.embeddings + feats.certainties, strict=True
        )
    )
    evaluator = RetrievalEvaluator(METRICS, return_per_query=True)
    loo = AVSLScorer(sim, gathered)
    qg = AVSLScorer(sim, gathered.rows(slice(0, 4)), gathered)
    for name, scorer_, kwargs in (
        ("loo", loo, {"query_labels": labels}),
        ("qg", qg, {"query_labels": labels[:4], "gallery_labels": labels}),
        ("rescored", loo, {"query_labels": labels, "candidates": loo.shortlist(5)}),
    ):
        out[name] = evaluator.from_scorer(scorer_, **kwargs, query_block_size=2, group=group)
        out[name + "_single"] = evaluator.from_scorer(scorer_, **kwargs, query_block_size=2)
    try:  # so are ranks asking for different depths
        pairwise_knn(loo, 2 + rank, exclude_self=True, group=group)
    except ValueError as e:
        out["knn_mismatch"] = str(e)
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(4))
    table[5, 5] = float("nan")  # scored only by the last rank's blocks: every rank must raise, none hang
    nan = TableScorer(table)
    for name, call in (
        ("nan_blocks", lambda: pairwise_knn(nan, 2, query_block_size=1, gallery_block_size=1, group=group)),
        ("nan_pairs", lambda: score_candidates(nan, _all_ids(6), chunk_size=1, group=group)),
    ):
        try:
            call()
        except ValueError as e:
            out[name] = str(e)
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(0, 3, (9, 9), generator=g).float()  # few distinct scores: ties everywhere
    tied = TableScorer(ties + ties.T)
    tied.symmetric = True  # type: ignore[attr-defined]  # the table is symmetric: the mirrored walk
    # (4, 8): query/gallery has 2 blocks, so with 3 ranks one scores none
    for block, gallery_block in ((2, 4), (4, 8)):
        for scorer_, exclude in ((loo, True), (qg, False), (tied, True), (TableScorer(ties), False)):
            sizes = {"query_block_size": block, "gallery_block_size": gallery_block}
            found = pairwise_knn(scorer_, 5, exclude_self=exclude, **sizes, group=group)
            alone = pairwise_knn(scorer_, 5, exclude_self=exclude, **sizes)
            out.setdefault("knn_equal", []).append(
                torch.equal(found.scores, alone.scores) and torch.equal(found.indices, alone.indices)
            )
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_pipelines_equal_one_process(world: int, tmp_path: Path) -> None:
    results = run_world(_pipelines, world, str(tmp_path))
    for r, out in enumerate(results):
        # shares: contiguous, in rank order, the first n % world ranks one item more
        for n in (0, 1, 2, 5, 7):
            sizes = [n // world + (q < n % world) for q in range(world)]
            assert out["shares"][n] == range(sum(sizes[:r]), sum(sizes[: r + 1]))
        # 1. the shards read as one store hold every image's rows, in image order
        assert torch.equal(out["merged_rows"], _rows(NUM_DATABASE, 1))
        assert torch.equal(out["merged_picked"], _rows(NUM_DATABASE, 1)[[7, 0, 7, 3]])
        assert out["merged_images"] == range(NUM_DATABASE)
        # 2. AMES: identical cache, raw scores and ranking
        assert out["cache_equal"]
        assert torch.equal(out["raw"], out["raw_single"]) and torch.isfinite(out["raw"]).all()
        assert torch.equal(out["raw_direct"], out["raw_direct_single"])
        assert torch.equal(out["ranking"], out["ranking_single"])
        assert torch.equal(out["raw"], results[0]["raw"])  # every rank holds all of it
        assert "score_candidates: every rank must pass the same arguments" in out["mismatch"]
        assert "candidates" in out["mismatch"]
        assert f"k: {[2 + q for q in range(world)]}" in out["knn_mismatch"]
        assert f"rank {world - 1}: scores from TableScorer" in out["nan_blocks"]
        assert f"rank {world - 1}: scores from TableScorer" in out["nan_pairs"]
        # 3. AVSL: identical metrics in every mode
        assert out["features_equal"]
        for name in ("loo", "qg", "rescored"):
            sharded, alone = out[name], out[name + "_single"]
            assert sharded.metrics == alone.metrics, (r, name)
            assert all(torch.equal(sharded.per_query[m], alone.per_query[m]) for m in METRICS), (r, name)
        assert all(out["knn_equal"])


# ---------------------------------------------------------------------------------------- shard validation
def _write_shard(path: Path, images: range, total: int, dim: int = DIM, rows: int | None = None) -> str:
    with DescriptorStore.create(path, total, TOPK, dim, shard=images) as store:
        written = len(images) if rows is None else rows
        if written:
            store.write(0, torch.ones(written, TOPK, HEADER + dim))
    return str(path)


def test_open_shards_refuses_inconsistent_shards(tmp_path: Path) -> None:
    a, b = _write_shard(tmp_path / "a.h5", range(0, 3), 5), _write_shard(tmp_path / "b.h5", range(3, 5), 5)
    empty = _write_shard(tmp_path / "e.h5", range(5, 5), 5)  # a rank with no images (more ranks than images)
    with DescriptorStore.open_shards([b, empty, a]) as store:
        assert len(store) == 5 and torch.equal(store.read_rows([4, 1]), torch.ones(2, TOPK, HEADER + DIM))
    with pytest.raises(ValueError, match=r"leave images 3 \.\. 4 out .*a shard is missing"):
        DescriptorStore.open_shards([a])
    with pytest.raises(FileNotFoundError, match=r"c\.h5 does not exist"):
        DescriptorStore.open_shards([a, str(tmp_path / "c.h5")])
    with pytest.raises(ValueError, match="overlap"):
        DescriptorStore.open_shards([a, _write_shard(tmp_path / "o.h5", range(2, 5), 5)])
    with pytest.raises(ValueError, match=r"leave images 3 \.\. 3 out"):
        DescriptorStore.open_shards([a, _write_shard(tmp_path / "g.h5", range(4, 5), 5)])
    with pytest.raises(ValueError, match="shards disagree"):  # descriptor dimension
        DescriptorStore.open_shards([a, _write_shard(tmp_path / "d.h5", range(3, 5), 5, dim=DIM + 1)])
    with pytest.raises(ValueError, match="shards disagree"):  # size of the whole store
        DescriptorStore.open_shards([a, _write_shard(tmp_path / "t.h5", range(3, 5), 6)])
    with h5py.File(tmp_path / "f16.h5", "w") as f:  # a shard of float16 rows, written by other means
        ds = f.create_dataset("features", data=np.ones((2, TOPK, HEADER + DIM), np.float16))
        ds.attrs["shard_start"], ds.attrs["num_images"] = 3, 5
    with pytest.raises(ValueError, match=r"shards disagree.*float16"):
        DescriptorStore.open_shards([a, str(tmp_path / "f16.h5")])
    with pytest.raises(ValueError, match="1 of its 2 images written"):
        DescriptorStore.open_shards([a, _write_shard(tmp_path / "i.h5", range(3, 5), 5, rows=1)])
    with DescriptorStore.create(tmp_path / "u.h5", 5, TOPK, DIM, shard=range(3, 5), chunked=False):
        pass  # contiguous storage, never written: it would read as zeros
    with pytest.raises(ValueError, match="none of its 2 images written"):
        DescriptorStore.open_shards([a, str(tmp_path / "u.h5")])
    with DescriptorStore.create(tmp_path / "plain.h5", 2, TOPK, DIM) as plain:
        plain.write(0, torch.ones(2, TOPK, HEADER + DIM))
    with pytest.raises(ValueError, match="is not a shard"):
        DescriptorStore.open_shards([a, str(tmp_path / "plain.h5")])
    with pytest.raises(ValueError, match="non-empty list"):
        DescriptorStore.open_shards([])
    with pytest.raises(ValueError, match="contiguous range"):
        DescriptorStore.create(tmp_path / "x.h5", 5, TOPK, DIM, shard=range(3, 7))
    with pytest.raises(ValueError, match="contiguous range"):
        DescriptorStore.create(tmp_path / "x.h5", 5, TOPK, DIM, shard=range(0, 5, 2))
    with pytest.raises(ValueError, match="contiguous range"):
        DescriptorStore.create(tmp_path / "x.h5", 5, TOPK, DIM, shard=range(4, 2))


def test_shard_range_single_process() -> None:
    """Without a process group a share is everything."""
    assert shard_range(4) == range(4)
    with pytest.raises(ValueError, match="num_items"):
        shard_range(-1)
    with pytest.raises(TypeError, match="num_items"):
        shard_range(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("symmetric", [True, False])
def test_leave_one_out_leaves_the_scorers_blocks_unchanged(symmetric: bool) -> None:
    """The walk masks each query's own column in a copy: a TableScorer's blocks are views of its table."""
    table = torch.rand(7, 7, generator=torch.Generator().manual_seed(0))
    table = table + table.T
    scorer = TableScorer(table.clone())
    scorer.symmetric = symmetric  # type: ignore[attr-defined]
    for _ in range(2):  # the second walk used to find -inf on the diagonal and refuse it
        found = pairwise_knn(scorer, 3, exclude_self=True, query_block_size=3, gallery_block_size=3)
    assert torch.equal(scorer.table, table)
    expected = table.fill_diagonal_(float("-inf")).topk(3, dim=1)
    assert torch.equal(found.indices, expected.indices) and torch.equal(found.scores, expected.values)


def test_a_scorers_nan_is_named_in_one_process_too() -> None:
    table = torch.zeros(3, 3)
    table[2, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"scores from TableScorer contains NaN or inf values \(first at row 1\)"
    ):
        score_candidates(TableScorer(table), _all_ids(3), chunk_size=2)  # the chunk's 2nd pair: (2, 1)
    with pytest.raises(ValueError, match="scores from TableScorer contains NaN"):
        pairwise_knn(TableScorer(table), 1)
