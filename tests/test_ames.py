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
            with pytest.raises(ValueError, match="a BinaryCodeStore database needs a binarized model"):
                AMESScorer(model, queries, code_store)
        for name, (q_source, db_source) in sources.items():
            scorer = AMESScorer(
                model, q_source, db_source, query_descriptors=10, database_descriptors=5, batch_size=2
            )
            for q in (0, 1, 2, 1):
                torch.testing.assert_close(scorer(q, ids), expected[q], atol=1e-4, rtol=1e-4, msg=name)
        with pytest.raises(ValueError, match="ids must be a 1-D integer tensor"):
            scorer(0, ids.float())
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
        torch.testing.assert_close(fast(q, ids), exact(q, ids), atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match=r"amp_dtype must be torch\.float16 or torch\.bfloat16"):
        AMESScorer(model, queries, cache, amp_dtype=torch.float64)


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
            torch.testing.assert_close(gpu(q, ids), cpu(q, ids), atol=5e-2, rtol=5e-2)
