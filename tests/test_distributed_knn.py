"""The sharded exact kNN in real gloo processes, against one-process ``knn`` on the concatenated data.

Each world size is spawned once and runs every case; the parent compares bit patterns (scores and
indices, ties included) against ``knn`` on all queries ordered by query id and all gallery rows ordered by
gallery id. Odd dims and block sizes put operands at unaligned addresses, uncentred data gives L2 a shifted
origin, and integer-valued rows duplicated across ranks make exact ties.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from objretrieval.distributed.knn import sharded_knn
from objretrieval.search import knn
from tests.spawn import run_world

METRICS = ["cosine", "ip", "l2"]
#: (k, block_size, query_block_size); k=None means the largest k the gallery allows.
BLOCKINGS = [(3, 8, 5), (7, 16, 4), (None, None, 1024)]
CASES = [(m, loo, b) for m in METRICS for loo in (False, True) for b in BLOCKINGS]


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [part.clone() for part in x.split(sizes)]  # clones: each shard is a tensor of its own


def _interleaved_ids(n: int, world: int, seed: int, scale: int = 1) -> list[torch.Tensor]:
    """DistributedSampler-like ids: rank r holds r, r + W, r + 2W, ... (times ``scale``), shuffled."""
    g = torch.Generator().manual_seed(seed)
    return [
        scale * torch.arange(r, n, world)[torch.randperm(len(range(r, n, world)), generator=g)]
        for r in range(world)
    ]


def _datasets(world: int) -> dict[str, dict[str, Any]]:
    """Per-rank shards, global ids (None: rank-major), and the one-process data ordered by id."""
    torch.manual_seed(world)
    q_sizes, g_sizes = ([1, 22], [30, 0]) if world == 2 else ([9, 0, 14], [20, 1, 27])
    nq, ng = sum(q_sizes), sum(g_sizes)
    uncentred_q, uncentred_g = torch.randn(nq, 13) + 3.0, torch.randn(ng, 13) + 3.0
    # integer rows with many exact copies, spread over the ranks: ties in every metric
    pool = torch.randint(-2, 3, (6, 5)).float()
    ties_q, ties_g = pool[torch.randint(0, 6, (nq,))], pool[torch.randint(0, 6, (ng,))]
    data = {
        "uncentred": (uncentred_q, uncentred_g),
        "float64": (uncentred_q.double(), uncentred_g.double()),  # prepared copies instead of views
        "ties": (ties_q, ties_g),
    }
    out = {}
    for name, (q, g) in data.items():
        out[name] = {
            "q": _split(q, q_sizes),
            "g": _split(g, g_sizes),
            "qids": None,
            "gids": None,
            "Q": q,
            "G": g,
        }
    # interleaved ids: the row with query id i is ties_q[i], the row with gallery id 2 j is ties_g[j] (gaps)
    qids, gids = _interleaved_ids(nq, world, 1), _interleaved_ids(ng, world, 2, scale=2)
    out["interleaved"] = {
        "q": [ties_q[ids] for ids in qids],
        "g": [ties_g[ids // 2] for ids in gids],
        "qids": qids,
        "gids": gids,
        "Q": ties_q,
        "G": ties_g,
    }
    return out


def _resolve_k(k: int | None, loo: bool, d: dict[str, Any]) -> int:
    n = len(d["Q"]) if loo else len(d["G"])
    return k if k is not None else n - 1 if loo else n


def _search_cases(rank: int, world: int, data: dict[str, dict[str, Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for name, d in data.items():
        for metric, loo, (k, bs, qbs) in CASES:
            qids = None if d["qids"] is None else d["qids"][rank]
            gids = None if d["gids"] is None else d["gids"][rank]
            found = sharded_knn(
                d["q"][rank],
                None if loo else d["g"][rank],
                k=_resolve_k(k, loo, d),
                metric=metric,
                gallery_ids=qids if loo else gids,  # leave-one-out: the query rows' ids, also as query_ids
                query_ids=qids,
                block_size=bs,
                query_block_size=qbs,
            )
            out[name, metric, loo, k, bs, qbs] = (found.scores, found.indices)
    d = data["uncentred"]
    via_knn = knn(d["q"][rank], d["g"][rank], k=5, metric="l2", group=dist.group.WORLD)
    out["knn(group=)"] = (via_knn.scores, via_knn.indices)
    out["errors"] = _error_cases(rank, world)
    return out


def _message(call) -> str | None:
    try:
        call()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _error_cases(rank: int, world: int) -> dict[str, str | None]:
    """Each bad call must raise on every rank (and leave the ranks in step for the next collective)."""
    x = torch.randn(4 + rank, 6)
    ids = torch.arange(rank * 4, rank * 4 + x.shape[0])
    clash = ids.clone()
    clash[0] = 0  # rank 0 owns id 0 too
    nan = x.clone()
    nan[1, 2] = float("nan")
    n = sum(4 + r for r in range(world))
    cases = {
        "duplicate ids": lambda: sharded_knn(x, x, k=2, gallery_ids=clash),
        "duplicate loo ids": lambda: sharded_knn(x, k=2, query_ids=clash),
        "gallery dims differ across ranks": lambda: sharded_knn(x, torch.randn(5, 6 + (rank == 1)), k=2),
        "query vs gallery dim": lambda: sharded_knn(x, torch.randn(5, 7), k=2),
        "k too big": lambda: sharded_knn(x, x, k=n + 1),
        "k too big loo": lambda: sharded_knn(x, k=n),
        "nan on one rank": lambda: sharded_knn(nan if rank == 1 else x, x, k=2),
        "k differs": lambda: sharded_knn(x, x, k=2 + (rank == 0)),
        "mode differs": lambda: sharded_knn(x, None if rank == 0 else x, k=2),
        "ids shape": lambda: sharded_knn(x, x, k=2, gallery_ids=ids[:-1] if rank == 1 else ids),
        "loo ids disagree": lambda: sharded_knn(x, k=2, gallery_ids=ids, query_ids=ids.flip(0)),
        "no queries anywhere": lambda: sharded_knn(x[:0], x, k=2),
        "knn(group=) with exclude": lambda: knn(
            x, x, k=2, exclude=torch.zeros(len(x)), group=dist.group.WORLD
        ),
    }
    messages = {name: _message(call) for name, call in cases.items()}
    messages["still in step"] = str(sharded_knn(x, x, k=3).indices.shape)
    return messages


def _one_process(fn, *args, **kwargs):
    """The reference, single-threaded like the spawned ranks (the BLAS rounds the same way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _bits(scores: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns: ``torch.equal`` on values would let -0.0 pass for +0.0."""
    return scores.view(torch.int32)


def _by_id(parts: list[torch.Tensor], ids: list[torch.Tensor] | None) -> torch.Tensor:
    """Concatenate per-rank rows in global id order (rank-major when no ids)."""
    rows = torch.cat(parts)
    return rows if ids is None else rows[torch.cat(ids).argsort()]


ERRORS = {
    "duplicate ids": "gallery_ids must be unique over all ranks: id 0 is given more than once",
    "duplicate loo ids": "query_ids must be unique over all ranks",
    "gallery dims differ across ranks": "gallery: every rank must pass a tensor of 1 to 8 dimensions",
    "query vs gallery dim": "gallery has dim 7 but queries have dim 6",
    "k too big": "is larger than the gallery",
    "k too big loo": "is larger than the queries minus the excluded query itself",
    "nan on one rank": "rank 1: queries contains NaN or inf values",
    "k differs": "every rank must pass the same",
    "mode differs": "every rank must pass the same",
    "ids shape": r"rank 1: gallery_ids must have shape",
    "loo ids disagree": "with gallery=None the gallery is the queries",
    "no queries anywhere": "queries are empty on every rank",
    "knn(group=) with exclude": "supports the torch backend only",
}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_knn_is_bit_identical_to_one_process(world: int) -> None:
    data = _datasets(world)
    results = run_world(_search_cases, world, data)
    for name, d in data.items():
        queries_by_id = d["Q"]  # the datasets' global rows are already in id order
        for metric, loo, (k, bs, qbs) in CASES:
            key = (name, metric, loo, k, bs, qbs)
            kk = _resolve_k(k, loo, d)
            if loo:
                ref = _one_process(knn, queries_by_id, k=kk, metric=metric, block_size=bs)
            else:
                ref = _one_process(
                    knn, queries_by_id, d["G"], k=kk, metric=metric, block_size=bs, query_block_size=qbs
                )
            ref_indices = (
                ref.indices if d["gids"] is None or loo else 2 * ref.indices
            )  # gallery ids 0, 2, 4, ...
            got_scores = _by_id([r[key][0] for r in results], d["qids"])
            got_indices = _by_id([r[key][1] for r in results], d["qids"])
            assert torch.equal(got_indices, ref_indices), key
            assert torch.equal(_bits(got_scores), _bits(ref.scores)), key
    d = data["uncentred"]
    ref = _one_process(knn, d["Q"], d["G"], k=5, metric="l2")
    assert torch.equal(torch.cat([r["knn(group=)"][1] for r in results]), ref.indices)
    assert torch.equal(_bits(torch.cat([r["knn(group=)"][0] for r in results])), _bits(ref.scores))
    for r, result in enumerate(results):
        for name, expected in ERRORS.items():
            got = result["errors"][name]
            assert got is not None and expected in got.replace("\\", ""), (r, name, got)
        assert result["errors"]["still in step"] == str(torch.Size([4 + r, 3]))


def test_world_of_one_is_knn_on_the_rows_ordered_by_id() -> None:
    q, g = torch.randn(20, 6), torch.randn(35, 6)
    qids, gids = torch.randperm(20), 3 * torch.randperm(35) + 1
    for metric in METRICS:
        got = sharded_knn(q, g, k=4, metric=metric, gallery_ids=gids, query_ids=qids, block_size=8)
        ref = knn(q[qids.argsort()], g[gids.argsort()], k=4, metric=metric, block_size=8)
        assert torch.equal(got.indices, gids.sort().values[ref.indices][qids])
        assert torch.equal(got.scores, ref.scores[qids])
        loo = sharded_knn(q, k=4, metric=metric, query_ids=qids)
        ref = knn(q[qids.argsort()], k=4, metric=metric)
        assert torch.equal(loo.indices, ref.indices[qids]) and torch.equal(loo.scores, ref.scores[qids])
    plain = sharded_knn(q, g, k=4)
    assert torch.equal(plain.indices, knn(q, g, k=4, query_block_size=1024).indices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gallery_ids": torch.zeros(35, dtype=torch.int64)}, "gallery_ids must be unique"),
        ({"gallery_ids": torch.arange(34)}, r"gallery_ids must have shape \(35,\)"),
        ({"gallery_ids": torch.arange(35.0)}, "gallery_ids must hold integer ids"),
        ({"query_ids": -torch.arange(20)}, "query_ids must be >= 0"),
        ({"k": 36}, "k=36 is larger than the gallery"),
        ({"metric": "euclid"}, "metric must be one of"),
    ],
)
def test_world_of_one_rejects_bad_input(kwargs: dict[str, Any], message: str) -> None:
    args = {"k": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        sharded_knn(torch.randn(20, 6), torch.randn(35, 6), **args)
