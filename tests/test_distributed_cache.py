"""``DatabaseCache.build(..., group=)`` over real gloo processes: each rank projects its share of the blocks, and
every rank's cache equals, bit for bit, the cache one process builds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from objretrieval import knn
from objretrieval.models import AMES
from objretrieval.reranking import AMESScorer, DatabaseCache, score_shortlist
from tests.spawn import run_world

NUM_IMAGES, SLOTS, KEPT, LOCAL_DIM = 7, 6, 5, 16  # KEPT < SLOTS: max_descriptors cuts every image
BLOCK_SIZES = (2, 4)  # 4 blocks (uneven over 2 and 3 ranks), 2 blocks (3 ranks: one without blocks)


def _ames(binarized: bool) -> AMES:
    torch.manual_seed(0)  # the same random weights in every process
    return AMES(
        local_dim=LOCAL_DIM,
        model_dim=16,
        nhead=2,
        num_encoder_layers=1,
        dim_feedforward=32,
        binarized=binarized,
    ).eval()


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, SLOTS, LOCAL_DIM) descriptors and padding, image i with its last i % 3 slots padded."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.zeros(n, SLOTS, dtype=torch.bool)
    for i in range(n):
        padding[i, SLOTS - i % 3 :] = True
    return torch.randn(n, SLOTS, LOCAL_DIM, generator=g), padding


def _data(cache: DatabaseCache) -> torch.Tensor:
    data = cache.codes if cache.codes is not None else cache.tokens
    assert data is not None
    return data


def _error(call: Callable[[], object]) -> str:
    try:
        call()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _caches(rank: int, world: int) -> dict:
    """Each cache built sharded (``group=WORLD``) and by this process alone, and the scores of both."""
    group, out = dist.group.WORLD, {}
    database, queries = _images(NUM_IMAGES, 0), _images(3, 1)
    g = torch.Generator().manual_seed(2)
    shortlist = knn(torch.randn(3, 4, generator=g), torch.randn(NUM_IMAGES, 4, generator=g), k=5)
    for binarized in (False, True):
        model = _ames(binarized)
        for block_size in BLOCK_SIZES:
            shared = DatabaseCache.build(
                model, database, max_descriptors=KEPT, block_size=block_size, group=group
            )
            alone = DatabaseCache.build(model, database, max_descriptors=KEPT, block_size=block_size)
            key = (binarized, block_size)
            out[key] = {
                "data": _data(shared),
                "keep": shared.keep,
                "equal": torch.equal(_data(shared), _data(alone)) and torch.equal(shared.keep, alone.keep),
                "dtypes": (_data(shared).dtype, _data(alone).dtype),
            }
            scores = [
                score_shortlist(
                    AMESScorer(model, queries, cache, query_descriptors=SLOTS, batch_size=3),
                    shortlist,
                    k=5,
                    chunk_size=4,
                    group=group if cache is shared else None,
                )
                for cache in (shared, alone)
            ]
            out[key]["scores_equal"] = torch.equal(*scores) and bool(torch.isfinite(scores[0]).all())
    # bad or disagreeing arguments raise on every rank, instead of hanging the others in the exchange
    model = _ames(False)
    nan = database[0].clone()
    nan[NUM_IMAGES - 1, 0, 0] = float("nan")  # in the last block: the last rank's share
    calls = {
        "block_size": lambda: DatabaseCache.build(model, database, block_size=2 + rank, group=group),
        "images": lambda: DatabaseCache.build(
            model, (database[0][: NUM_IMAGES - rank], database[1][: NUM_IMAGES - rank]), group=group
        ),
        "max_descriptors": lambda: DatabaseCache.build(
            model, database, max_descriptors=KEPT if rank == 0 else 0, group=group
        ),
        "nan": lambda: DatabaseCache.build(model, (nan, database[1]), block_size=2, group=group),
    }
    out["errors"] = {name: _error(call) for name, call in calls.items()}
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_cache_equals_one_process(world: int) -> None:
    results = run_world(_caches, world)
    padding = _images(NUM_IMAGES, 0)[1]
    for r, out in enumerate(results):
        for binarized in (False, True):
            for block_size in BLOCK_SIZES:
                got = out[(binarized, block_size)]
                assert got["equal"], (r, binarized, block_size)  # bit for bit, within the rank
                assert got["dtypes"] == ((torch.uint8,) * 2 if binarized else (torch.float16,) * 2)
                assert torch.equal(got["keep"], ~padding[:, :KEPT])
                assert got["data"].shape[:2] == (NUM_IMAGES, KEPT)
                first = results[0][(binarized, block_size)]  # every rank holds the same cache
                assert torch.equal(got["data"], first["data"]) and torch.equal(got["keep"], first["keep"])
                assert got["scores_equal"], (r, binarized, block_size)
        errors = out["errors"]
        assert "every rank must pass the same arguments" in errors["block_size"]
        assert f"block_size: {[2 + q for q in range(world)]}" in errors["block_size"]
        assert f"images: {[NUM_IMAGES - q for q in range(world)]}" in errors["images"]
        assert errors["max_descriptors"].startswith("ValueError: DatabaseCache.build: rank 1: max_descrip")
        assert f"rank {world - 1}: database (image {NUM_IMAGES - 1}) contains NaN" in errors["nan"]


def test_build_refuses_a_group_without_torch_distributed() -> None:
    database = _images(NUM_IMAGES, 0)
    with pytest.raises(RuntimeError, match=r"group=.*needs torch.distributed: call init_process_group"):
        DatabaseCache.build(_ames(False), database, group=object())  # a group, but no process group is up
    # WORLD is None before init_process_group: the process builds the whole cache alone
    alone = DatabaseCache.build(_ames(False), database, max_descriptors=KEPT, group=dist.group.WORLD)
    assert torch.equal(alone.keep, ~database[1][:, :KEPT])


@pytest.mark.parametrize("binarized", [False, True])
def test_build_refuses_an_empty_database(binarized: bool) -> None:
    with pytest.raises(ValueError, match="database holds no images"):
        DatabaseCache.build(_ames(binarized), _images(0, 0))
