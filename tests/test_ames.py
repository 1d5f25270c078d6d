"""AMES model behaviour beyond the parity fixtures: input checks, batching, packed codes, caches, training."""

from __future__ import annotations

import pytest
import torch

from objretrieval import create_model, list_models
from objretrieval.descriptors import HEADER, BinaryCodeStore, DescriptorStore
from objretrieval.losses import PairBCELoss
from objretrieval.models import AMES
from objretrieval.reranking import AMESScorer, DatabaseCache

LOCAL_DIM = 24


def _model(binarized: bool = False, **kwargs) -> AMES:
    torch.manual_seed(0)
    model = AMES(
        LOCAL_DIM,
        model_dim=32,
        nhead=2,
        num_encoder_layers=2,
        dim_feedforward=64,
        binarized=binarized,
        **kwargs,
    )
    return model.eval()


def _descriptors(n: int, t: int, seed: int, pad_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    local = torch.randn(n, t, LOCAL_DIM, generator=g)
    padding = torch.zeros(n, t, dtype=torch.bool)
    if pad_from is not None:
        padding[:, pad_from:] = True
        local[:, pad_from:] = 0.0  # as in the official files
    return local, padding


def _pairwise(
    model: AMES, q: torch.Tensor, qpad: torch.Tensor, db: torch.Tensor, dbpad: torch.Tensor
) -> torch.Tensor:
    """Logits of one query against each database image, one forward call per pair."""
    with torch.no_grad():
        return torch.cat(
            [model(q[None], db[i : i + 1], qpad[None], dbpad[i : i + 1]) for i in range(db.shape[0])]
        )


def test_builders_are_registered_with_pretrained_configs() -> None:
    names = {"dinov2_ames", "dinov2_ames_dist", "cvnet_ames", "cvnet_ames_dist"}
    assert names <= set(list_models())
    for name in names:
        model = create_model(name)
        assert model.local_dim == (768 if name.startswith("dinov2") else 1024)
        assert model.binarized == name.endswith("_dist")
        from objretrieval.models import get_model_entry

        cfg = get_model_entry(name).pretrained_cfgs
        assert any(c.url.endswith(f"/{name}.pt") for c in cfg.values())


def test_torch_hub_entry_points_load_official_checkpoints(tmp_path) -> None:
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    names = {"dinov2_ames", "dinov2_ames_dist", "cvnet_ames", "cvnet_ames_dist"}
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_for_ames", Path(repo) / "hubconf.py")
    assert spec is not None and spec.loader is not None
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert names <= set(dir(hubconf))  # what torch.hub.list reads
    reference = create_model("cvnet_ames_dist")
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_()
    torch.save(
        {"state": reference.state_dict(), "epoch": 3}, tmp_path / "cvnet_ames_dist.pt"
    )  # the official layout
    model = torch.hub.load(
        repo, "cvnet_ames_dist", source="local", checkpoint=str(tmp_path / "cvnet_ames_dist.pt")
    )
    assert isinstance(model, AMES) and model.binarized and model.local_dim == 1024
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_masks_are_optional_and_padding_is_ignored() -> None:
    model = _model()
    q, qpad = _descriptors(3, 10, seed=1)
    db, dbpad = _descriptors(3, 6, seed=2)
    with torch.no_grad():
        plain = model(q, db)
        torch.testing.assert_close(model(q, db, qpad, dbpad), plain)
        # extra padded slots filled with garbage change nothing
        q_extra = torch.cat([q, torch.randn(3, 4, LOCAL_DIM) * 50], 1)
        q_mask = torch.cat([qpad, torch.ones(3, 4, dtype=torch.bool)], 1)
        torch.testing.assert_close(model(q_extra, db, q_mask, dbpad), plain, atol=1e-5, rtol=1e-5)


def test_one_query_against_many_candidates_in_one_call() -> None:
    model = _model()
    q, qpad = _descriptors(1, 12, seed=3, pad_from=9)
    db, dbpad = _descriptors(7, 5, seed=4, pad_from=4)
    expected = _pairwise(model, q[0], qpad[0], db, dbpad)
    with torch.no_grad():
        batched = model.score(model.project_query(q[0], qpad[0]), model.project_database(db, dbpad))
    assert batched.shape == (7,)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)


def test_eval_rounds_database_tokens_to_float16_and_training_does_not() -> None:
    model = _model()
    db, dbpad = _descriptors(2, 5, seed=5)
    assert model.project_database(db, dbpad).tokens.dtype == torch.float16
    model.train()
    assert model.project_database(db, dbpad).tokens.dtype == torch.float32


@pytest.mark.parametrize("binarized", [False, True])
def test_training_step_reaches_every_parameter(binarized: bool) -> None:
    model = _model(binarized).train()
    q, qpad = _descriptors(4, 8, seed=6, pad_from=6)
    db, dbpad = _descriptors(4, 5, seed=7)
    loss = PairBCELoss()(model(q, db, qpad, dbpad), torch.tensor([1, 0, 1, 0]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_packed_codes_score_like_the_descriptors() -> None:
    model = AMES(
        LOCAL_DIM, model_dim=128, nhead=2, num_encoder_layers=1, dim_feedforward=64, binarized=True
    ).eval()
    db, dbpad = _descriptors(3, 50, seed=8, pad_from=45)
    codes, keep = model.binary_codes(db, dbpad)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 50, 16)  # 128 bits in 16 bytes
    assert codes[0].numel() == 800  # 50 descriptors: 800 bytes per image
    assert torch.equal(keep, ~dbpad)
    from_codes = model.project_codes(codes, keep)
    direct = model.project_database(db, dbpad)
    torch.testing.assert_close(from_codes.tokens[keep], direct.tokens[keep].float())
    q, _ = _descriptors(1, 9, seed=9)
    with torch.no_grad():
        query = model.project_query(q[0])
        torch.testing.assert_close(
            model.score(query, from_codes), model.score(query, direct), atol=1e-5, rtol=1e-5
        )


def test_input_errors() -> None:
    model = _model()
    q, _ = _descriptors(2, 4, seed=10)
    with pytest.raises(ValueError, match=rf"query descriptors must be \(B, N, {LOCAL_DIM}\)"):
        model(q[..., :5], q)
    with pytest.raises(ValueError, match="database descriptors must be"):
        model(q, q[0])
    with pytest.raises(TypeError, match="floating point"):
        model(q, q.long())
    with pytest.raises(ValueError, match=r"database descriptors mask must have shape \(2, 4\)"):
        model(q, q, None, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary_codes needs a binarized model"):
        model.binary_codes(q)
    with pytest.raises(ValueError, match="activation must be"):
        AMES(LOCAL_DIM, activation="glu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible by nhead"):
        AMES(LOCAL_DIM, model_dim=30, nhead=4)


# -- caches and the scorer -------------------------------------------------------------------------------------


def _write_store(path, local: torch.Tensor, padding: torch.Tensor) -> None:
    rows = torch.zeros(*local.shape[:2], HEADER + LOCAL_DIM)
    rows[..., 3] = padding.float()
    rows[..., HEADER:] = local
    with DescriptorStore.create(path, local.shape[0], local.shape[1], LOCAL_DIM) as store:
        store.write(0, rows)


@pytest.mark.parametrize("binarized", [False, True])
def test_scorer_sources_agree_with_pairwise_forward(tmp_path, binarized: bool) -> None:
    model = _model(binarized)
    queries = _descriptors(3, 14, seed=11, pad_from=12)
    database = _descriptors(9, 8, seed=12, pad_from=6)
    _write_store(tmp_path / "q.h5", *queries)
    _write_store(tmp_path / "db.h5", *database)
    ids = torch.tensor([7, 2, 2, 0, 5])
    expected = [
        _pairwise(model, queries[0][q, :10], queries[1][q, :10], database[0][ids, :5], database[1][ids, :5])
        for q in range(3)
    ]
    with DescriptorStore(tmp_path / "q.h5") as qs, DescriptorStore(tmp_path / "db.h5") as ds:
        cache = DatabaseCache.build(model, ds, max_descriptors=5, block_size=4)
        assert len(cache) == 9 and (cache.codes is not None) == binarized
        assert cache.bytes_per_image == (5 * 32 // 8 if binarized else 5 * 32 * 2)
        sources = {
            "tensors": (queries, database),
            "stores": (qs, ds),
            "cache": (queries, cache),
            "cache from tensors": (queries, DatabaseCache.build(model, database, max_descriptors=5)),
        }
        if binarized:
            cache.save_codes(tmp_path / "codes.h5")
            code_store = BinaryCodeStore(tmp_path / "codes.h5")
            assert code_store.bytes_per_image == cache.bytes_per_image
            sources["code store"] = (queries, code_store)
            sources["cache from code store"] = (queries, DatabaseCache.from_code_store(code_store))
        else:
            with pytest.raises(ValueError, match="save_codes needs a cache built with a binarized model"):
                cache.save_codes(tmp_path / "codes.h5")
            code_store = _code_store(tmp_path)
            with pytest.raises(ValueError, match="packed binary codes, which need a binarized model"):
                AMESScorer(model, queries, code_store)
        for name, (q_source, db_source) in sources.items():
            scorer = AMESScorer(
                model, q_source, db_source, query_descriptors=10, database_descriptors=5, batch_size=2
            )
            for q in (0, 1, 2, 1):
                got = scorer.score_pairs(torch.full_like(ids, q), ids)
                torch.testing.assert_close(got, expected[q], atol=1e-4, rtol=1e-4, msg=name)
            # pairs of several queries in one call, in any order
            mixed = scorer.score_pairs(torch.tensor([2, 2, 0, 1, 0]), ids)
            reference = torch.stack(
                [expected[2][0], expected[2][1], expected[0][2], expected[1][3], expected[0][4]]
            )
            torch.testing.assert_close(mixed, reference, atol=1e-4, rtol=1e-4, msg=name)
        with pytest.raises(TypeError, match="gallery_ids must be a 1-D integer tensor"):
            scorer.score_pairs(torch.zeros(5, dtype=torch.long), ids.float())
        with pytest.raises(ValueError, match=r"gallery_ids must lie in \[0, 9\)"):
            scorer.score_pairs(torch.zeros(1, dtype=torch.long), torch.tensor([9]))
        with pytest.raises(ValueError, match="query_ids and gallery_ids must pair up"):
            scorer.score_pairs(torch.zeros(2, dtype=torch.long), ids)
        code_store.close()


def _code_store(tmp_path) -> BinaryCodeStore:
    with BinaryCodeStore.create(tmp_path / "other.h5", 2, 3, 32):
        pass
    return BinaryCodeStore(tmp_path / "other.h5")


def test_bfloat16_autocast_scoring_on_cpu() -> None:
    model = _model()
    queries, database = _descriptors(2, 20, seed=15), _descriptors(12, 8, seed=16)
    ids = torch.arange(12)
    cache = DatabaseCache.build(model, database, max_descriptors=8)
    exact = AMESScorer(model, queries, cache, query_descriptors=20)
    assert not exact.autocast  # off by default on the CPU
    fast = AMESScorer(model, queries, cache, query_descriptors=20, autocast=True, amp_dtype=torch.bfloat16)
    for q in range(2):
        qs = torch.full_like(ids, q)
        torch.testing.assert_close(
            fast.score_pairs(qs, ids), exact.score_pairs(qs, ids), atol=3e-2, rtol=3e-2
        )
    with pytest.raises(ValueError, match=r"amp_dtype must be torch\.float16 or torch\.bfloat16"):
        AMESScorer(model, queries, cache, amp_dtype=torch.float64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_scoring_matches_cpu() -> None:
    model = _model()
    queries, database = _descriptors(2, 20, seed=13), _descriptors(30, 8, seed=14)
    ids = torch.arange(30)
    cpu = AMESScorer(model, queries, database, query_descriptors=20, database_descriptors=8)
    gpu_model = _model().cuda()
    gpu_cache = DatabaseCache.build(gpu_model, database, max_descriptors=8)
    for amp_dtype in (torch.float16, torch.bfloat16):
        gpu = AMESScorer(
            gpu_model, queries, gpu_cache, query_descriptors=20, batch_size=16, amp_dtype=amp_dtype
        )
        assert gpu.autocast  # on by default on CUDA
        for q in range(2):
            qs = torch.full_like(ids, q)
            torch.testing.assert_close(
                gpu.score_pairs(qs, ids).cpu(), cpu.score_pairs(qs, ids), atol=5e-2, rtol=5e-2
            )


# -- one pairwise protocol: evaluation, rescoring ----------------------------------------------------------------


def _full_scores(model: AMES, queries, database) -> torch.Tensor:
    """(Q, N) logits, one forward call per pair: the brute-force reference."""
    return torch.stack(
        [_pairwise(model, queries[0][q], queries[1][q], *database) for q in range(queries[0].shape[0])]
    )


def test_evaluator_from_scorer_takes_an_ames_scorer() -> None:
    from objretrieval import RetrievalEvaluator
    from objretrieval.search import PairwiseScorer, pairwise_knn

    model = _model()
    queries, database = _descriptors(6, 7, seed=20, pad_from=5), _descriptors(10, 5, seed=21, pad_from=4)
    scorer = AMESScorer(model, queries, database, query_descriptors=7, database_descriptors=5, batch_size=3)
    assert isinstance(scorer, PairwiseScorer)
    full = _full_scores(model, queries, database)
    query_labels, gallery_labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(10) % 3
    metrics = ["recall@1", "recall@3", "map@r", "map"]
    evaluator = RetrievalEvaluator(metrics)
    expected = evaluator.from_ranking(full.argsort(dim=1, descending=True), query_labels, gallery_labels)
    exhaustive = evaluator.from_scorer(
        scorer, query_labels, gallery_labels, query_block_size=4, gallery_block_size=3
    )
    for name in metrics:
        assert exhaustive[name] == pytest.approx(expected[name], abs=1e-9), name
    # rescoring a shortlist: every candidate once, in another order, gives the same ranking
    candidates = torch.arange(10).flip(0).expand(6, 10)
    rescored = evaluator.from_scorer(scorer, query_labels, gallery_labels, candidates=candidates)
    for name in metrics:
        assert rescored[name] == pytest.approx(expected[name], abs=1e-9), name
    top = pairwise_knn(scorer, 4, candidates=torch.tensor([[3, -1, 7]] * 6))
    torch.testing.assert_close(
        top.scores[:, :2], full[:, [3, 7]].sort(dim=1, descending=True).values, atol=1e-4, rtol=1e-4
    )
    assert bool((top.indices[:, 2:] == -1).all())


def test_half_precision_descriptors_are_cast_to_the_model_dtype() -> None:
    model = _model()
    q, qpad = _descriptors(2, 6, seed=22)
    db, dbpad = _descriptors(2, 5, seed=23)
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            rounded = model(q.to(dtype).float(), db.to(dtype).float(), qpad, dbpad)
            torch.testing.assert_close(model(q.to(dtype), db.to(dtype), qpad, dbpad), rounded)
    cache = DatabaseCache.build(model, (db.half(), dbpad))
    scorer = AMESScorer(model, (q.half(), qpad), cache, query_descriptors=6)
    ids = torch.tensor([0, 1])
    with torch.no_grad():
        expected = model(q.half().float()[[0, 0]], db.half().float(), qpad[[0, 0]], dbpad)
    torch.testing.assert_close(
        scorer.score_pairs(torch.zeros(2, dtype=torch.long), ids), expected, atol=1e-4, rtol=1e-4
    )


def test_non_finite_and_all_padded_inputs_are_refused() -> None:
    model = _model()
    q, qpad = _descriptors(3, 6, seed=24)
    db, dbpad = _descriptors(4, 5, seed=25)
    bad = db.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"database descriptors contains NaN or inf values \(first at row 2\)"
    ):
        model(q[:1].expand(4, -1, -1), bad)
    empty = dbpad.clone()
    empty[1] = True
    with pytest.raises(ValueError, match="database descriptors: image 1 is entirely padding"):
        model(q[:1].expand(4, -1, -1), db, None, empty)
    empty_q = qpad.clone()
    empty_q[2] = True
    with pytest.raises(ValueError, match="query descriptors: image 2 is entirely padding"):
        model(q, db[:3], empty_q, dbpad[:3])
    with pytest.raises(
        ValueError, match=r"database \(images 0 \.\. 3\) contains NaN or inf values \(first at row 2\)"
    ):
        DatabaseCache.build(model, (bad, dbpad))
    with pytest.raises(ValueError, match=r"database \(images 0 \.\. 3\): image 1 is entirely padding"):
        DatabaseCache.build(model, (db, empty))
    scorer = AMESScorer(model, (q, empty_q), (bad, dbpad), query_descriptors=6, database_descriptors=5)
    with pytest.raises(
        ValueError, match=r"database \(images \[3, 2\]\) contains NaN or inf values \(first at row 1\)"
    ):
        scorer.score_pairs(torch.tensor([0, 0]), torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"queries \(image 2\): image 0 is entirely padding"):
        scorer.score_pairs(torch.tensor([2]), torch.tensor([0]))


def test_scorer_and_cache_argument_errors(tmp_path) -> None:
    model, binarized = _model(), AMES(LOCAL_DIM, model_dim=32, nhead=2, num_encoder_layers=1, binarized=True)
    queries, database = _descriptors(2, 6, seed=26), _descriptors(3, 5, seed=27)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        AMESScorer(model, queries, database, batch_size=0)
    with pytest.raises(ValueError, match="query_descriptors must be >= 1"):
        AMESScorer(model, queries, database, query_descriptors=0)
    with pytest.raises(ValueError, match="max_descriptors must be >= 1"):
        DatabaseCache.build(model, database, max_descriptors=-1)
    codes = DatabaseCache.build(binarized, database)
    with pytest.raises(ValueError, match="packed binary codes, which need a binarized model"):
        AMESScorer(model, queries, codes)
    with pytest.raises(ValueError, match="full-precision tokens, but the model is binarized"):
        AMESScorer(binarized, queries, DatabaseCache.build(model, database))
    with pytest.raises(TypeError, match="queries must be local descriptors"):
        AMESScorer(model, codes, database)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="database must be"):
        AMESScorer(model, queries, database[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="database padding must be a bool tensor"):
        AMESScorer(model, queries, (database[0], database[1].float()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"codes must be \(N, T, 4\) uint8"):
        binarized.project_codes(torch.zeros(1, 2, 3, dtype=torch.uint8), torch.ones(1, 2, dtype=torch.bool))


def test_pair_losses_refuse_non_finite_logits_and_keep_float64() -> None:
    from objretrieval.losses import PairDistillationLoss

    logits, targets = torch.tensor([0.5, float("nan"), 1.0]), torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match=r"logits contains NaN or inf values \(first at row 1\)"):
        PairBCELoss()(logits, targets)
    with pytest.raises(ValueError, match=r"student contains NaN or inf values \(first at row 1\)"):
        PairDistillationLoss()(logits, torch.zeros(3))
    with pytest.raises(ValueError, match=r"teacher contains NaN or inf values \(first at row 2\)"):
        PairDistillationLoss()(torch.zeros(3), torch.tensor([0.0, 1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        PairBCELoss()(torch.zeros(2), torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match=r"temperature must lie in \(0, inf\)"):
        PairDistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"pos_weight must lie in \(0, inf\)"):
        PairBCELoss(pos_weight=-1.0)
    x = torch.tensor([0.3, -2.0], dtype=torch.float64)
    loss = PairBCELoss(reduction="none")(x, torch.tensor([1, 0]))
    assert loss.dtype == torch.float64
    expected = torch.stack([-torch.log(torch.sigmoid(x[0])), -torch.log(1 - torch.sigmoid(x[1]))])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert PairDistillationLoss()(x, x.float()).dtype == torch.float64
