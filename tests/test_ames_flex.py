"""AMES attention on FlexAttention: the block masks against the official masking rule, and the same logits,
token states and scores as the dense path (float32 to 1e-5) on every AMES variant, padded inputs included."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from objretrieval import create_model
from objretrieval.losses import PairBCELoss
from objretrieval.models import AMES
from objretrieval.models.ames import _FLEX_BLOCK, _block_mask
from objretrieval.reranking import AMESScorer, DatabaseCache

SMALL = {"model_dim": 32, "nhead": 2, "num_encoder_layers": 2, "dim_feedforward": 48}
VARIANTS = {
    "dinov2": ("dinov2_ames", {}),
    "dinov2_dist": ("dinov2_ames_dist", {}),
    "cvnet": ("cvnet_ames", {}),
    "cvnet_dist": ("cvnet_ames_dist", {}),
    "prenorm_gelu_one_layer": (
        "dinov2_ames",
        {"normalize_before": True, "activation": "gelu", "num_encoder_layers": 1},
    ),
}
# (name, batch, Q, T, real query tokens per pair, real database tokens per pair)
SHAPES = [
    ("tiny", 2, 5, 3, [5, 2], [3, 3]),
    ("query_over_a_tile_all_but_one_padded", 3, 150, 40, [150, 100, 1], [40, 1, 17]),
    ("database_over_a_tile", 2, 7, 140, [7, 3], [140, 129]),
]


def _model(variant: str, attention: str = "dense") -> AMES:
    """A small model of ``variant`` with parameters re-drawn at O(1) scale (as the parity fixtures), so logits
    are O(1) and a 1e-5 tolerance means something; the default init gives logits near 0."""
    name, overrides = VARIANTS[variant]
    torch.manual_seed(0)
    model = create_model(name, **{**SMALL, **overrides}, attention=attention)
    assert isinstance(model, AMES)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


def _inputs(
    model: AMES, batch: int, q: int, t: int, q_real: list[int], t_real: list[int], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    src, tgt = (
        torch.randn(batch, q, model.local_dim, generator=g),
        torch.randn(batch, t, model.local_dim, generator=g),
    )
    src_pad = torch.arange(q)[None] >= torch.tensor(q_real)[:, None]
    tgt_pad = torch.arange(t)[None] >= torch.tensor(t_real)[:, None]
    return src, tgt, src_pad, tgt_pad


@contextlib.contextmanager
def _counting_flex_calls() -> Iterator[list[int]]:
    """Count the calls of torch's ``flex_attention`` (the flex path looks it up at each call)."""
    module = importlib.import_module("torch.nn.attention.flex_attention")
    original, calls = module.flex_attention, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    module.flex_attention = counted
    try:
        yield calls
    finally:
        module.flex_attention = original


def _same_as_dense(variant: str, args: tuple[torch.Tensor, ...], mode: str = "eval") -> None:
    dense, flex = _model(variant, "dense"), _model(variant, "flex")
    getattr(dense, mode)(), getattr(flex, mode)()
    layers = len(flex.decoder.layers)
    with torch.no_grad(), _counting_flex_calls() as calls:
        sim, states = dense(*args, return_logits=True)
        assert not calls
        flex_sim, flex_states = flex(*args, return_logits=True)
        assert len(calls) == 2 * layers  # self and cross attention of every layer
        flex_score_only = flex(*args)
        assert len(calls) == 4 * layers - 1  # the last cross-attention of m alone is one dense row
    torch.testing.assert_close(flex_sim, sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_states, states, atol=1e-5, rtol=1e-5)  # every position, padded ones too
    torch.testing.assert_close(flex_score_only, sim, atol=1e-5, rtol=1e-5)
    assert states.abs().amax() > 0.1 and sim.abs().amax() > 1e-3  # O(1) values: the tolerance means something


# -- block masks -----------------------------------------------------------------------------------------------


def _official_mask(keep: torch.Tensor, split: int, cross: bool) -> torch.Tensor:
    """(B, L, L) scored pairs by the official rule over [m, first image, second image]: self blocks each
    image's rows from the other image's columns, cross blocks them from their own; m is never blocked."""
    length = keep.shape[1]
    image = torch.tensor([0] + [1] * (split - 1) + [2] * (length - split))
    qi, ki = image[:, None], image[None, :]
    same = qi == ki
    allowed = (qi == 0) | (ki == 0) | (~same if cross else same)
    return allowed[None] & keep[:, None, :]


def _tiles(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full) per 128 x 128 tile of a (B, L, L) mask, tail padded as unscored."""
    b, length, _ = dense.shape
    n = -(-length // _FLEX_BLOCK)
    padded = torch.zeros(b, n * _FLEX_BLOCK, n * _FLEX_BLOCK, dtype=torch.bool)
    padded[:, :length, :length] = dense
    sums = padded.view(b, n, _FLEX_BLOCK, n, _FLEX_BLOCK).sum((2, 4))
    return sums > 0, sums == _FLEX_BLOCK**2


def _listed(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, Ti, Tj) bool from a BlockMask's per-row tile counts and indices."""
    used = torch.arange(indices.shape[-1]) < num[..., None].long()
    return torch.zeros(indices.shape, dtype=torch.bool).scatter_(-1, indices.long(), used)[:, 0]


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize(
    ("t", "q", "q_real"), [(50, 600, [600, 400, 1]), (3, 5, [5, 5, 2]), (130, 300, [1, 300, 129])]
)
def test_block_masks_list_exactly_the_tiles_with_scored_pairs(
    cross: bool, t: int, q: int, q_real: list[int]
) -> None:
    """Layout [m, database (t), query (q)] as the flex path builds it; padding of both images."""
    t_real = [t, max(1, t // 3), 1]
    keep = torch.cat(
        [
            torch.ones(3, 1, dtype=torch.bool),
            torch.arange(t)[None] < torch.tensor(t_real)[:, None],
            torch.arange(q)[None] < torch.tensor(q_real)[:, None],
        ],
        dim=1,
    )
    block_mask = _block_mask(keep, 1 + t, cross)
    official = _official_mask(keep, 1 + t, cross)
    scored, full = _tiles(official)
    partial = _listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    listed_full = _listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert torch.equal(partial | listed_full, scored) and torch.equal(listed_full, full)
    assert not (partial & listed_full).any()
    # the mask_mod applied inside partial tiles is the official rule, padding included
    b, qi, ki = torch.meshgrid(
        torch.arange(3), torch.arange(keep.shape[1]), torch.arange(keep.shape[1]), indexing="ij"
    )
    assert torch.equal(block_mask.mask_mod(b, torch.zeros_like(b), qi, ki), official)
    if t == 50:  # the specs' 600 / 50 (6 x 6 tiles): cross-attention of an unpadded pair runs m's row of
        # tiles and the query rows against the first key tile (m + database) only; padding skips more
        assert scored[0].sum() == (11 if cross else 36) and scored.sum() < scored.numel()
    # the very tensors torch's create_block_mask gives, contiguous as theirs: compiled kernels read them by
    # row-major offsets (strided indices ran the wrong tiles in a compiled call)
    reference = create_block_mask(block_mask.mask_mod, 3, 1, keep.shape[1], keep.shape[1], device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):  # fmt: skip
        ours, theirs = getattr(block_mask, name), getattr(reference, name)
        assert torch.equal(ours, theirs) and ours.is_contiguous() == theirs.is_contiguous(), name
    assert block_mask.seq_lengths == reference.seq_lengths and block_mask.BLOCK_SIZE == reference.BLOCK_SIZE


# -- same results as the dense path ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flex_logits_equal_dense_on_every_variant(variant: str) -> None:
    model = _model(variant)
    args = _inputs(model, 3, 150, 40, [150, 100, 1], [40, 1, 17], seed=1)
    _same_as_dense(variant, args)


@pytest.mark.parametrize(("name", "batch", "q", "t", "q_real", "t_real"), SHAPES, ids=[s[0] for s in SHAPES])
def test_flex_logits_equal_dense_on_padded_shapes(
    name: str, batch: int, q: int, t: int, q_real: list[int], t_real: list[int]
) -> None:
    args = _inputs(_model("dinov2"), batch, q, t, q_real, t_real, seed=2)
    _same_as_dense("dinov2", args)
    _same_as_dense(
        "dinov2_dist", _inputs(_model("dinov2_dist"), batch, q, t, q_real, t_real, seed=3), "train"
    )


def test_flex_scores_from_projections_and_in_the_scorer() -> None:
    """One query broadcast against several database images, from a cache, and through AMESScorer."""
    dense, flex = _model("dinov2"), _model("dinov2", "flex")
    src, tgt, src_pad, tgt_pad = _inputs(dense, 5, 30, 9, [30, 30, 12, 1, 30], [9, 4, 9, 1, 2], seed=4)
    with torch.no_grad():
        expected = dense.score(dense.project_query(src[0], src_pad[0]), dense.project_database(tgt, tgt_pad))
        got = flex.score(flex.project_query(src[0], src_pad[0]), flex.project_database(tgt, tgt_pad))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pairs = torch.tensor([0, 3, 3, 1]), torch.tensor([4, 0, 2, 2])
    scores = [
        AMESScorer(m, (src, src_pad), DatabaseCache.build(m, (tgt, tgt_pad)), batch_size=3).score_pairs(
            *pairs
        )
        for m in (dense, flex)
    ]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)


# -- the option ------------------------------------------------------------------------------------------------


def test_attention_option_switches_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("dinov2")
    assert model.attention == "dense" and model.set_attention("flex") is model and model.attention == "flex"
    assert create_model("cvnet_ames", **SMALL, attention="flex").attention == "flex"
    with pytest.raises(
        ValueError, match=r"attention must be one of \['dense', 'flex', 'auto'\], got 'sparse'"
    ):
        AMES(24, model_dim=32, attention="sparse")  # type: ignore[arg-type]
    assert not model.set_attention("auto")._uses_flex(torch.device("cpu"))  # auto: dense off CUDA
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # a torch without it
    with pytest.raises(ImportError, match=r"attention='flex' needs torch\.nn\.attention\.flex_attention"):
        model.set_attention("flex")
    model.set_attention("dense")  # dense needs nothing


def test_flex_refuses_cpu_training_and_keeps_the_input_checks() -> None:
    model = _model("dinov2", "flex").train()
    src, tgt, src_pad, tgt_pad = _inputs(model, 2, 6, 4, [6, 3], [4, 2])
    with pytest.raises(NotImplementedError, match="attention='flex' cannot train on the CPU"):
        model(src, tgt, src_pad, tgt_pad)
    tgt_pad[1] = True
    with pytest.raises(ValueError, match="image 1 is entirely padding"):
        model.eval()(src, tgt, src_pad, tgt_pad)


# -- CUDA: the compiled kernel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dinov2", "cvnet_dist"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_flex_equals_dense_with_gradients(variant: str) -> None:
    """The specs' 600 query / 50 database descriptors, float32: logits, states and every parameter gradient."""
    dense, flex = _model(variant).cuda(), _model(variant, "flex").cuda()
    args = [a.cuda() for a in _inputs(dense, 6, 600, 50, [600, 400, 1, 599, 600, 50], [50, 1, 50, 37, 50, 2])]
    with torch.no_grad():
        sim, states = dense(*args, return_logits=True)
        flex_sim, flex_states = flex(*args, return_logits=True)
    torch.testing.assert_close(flex_sim, sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_states, states, atol=1e-5, rtol=1e-5)
    labels = torch.tensor([1, 0, 1, 0, 1, 1], device="cuda")
    for m in (dense.train(), flex.train()):
        PairBCELoss()(m(*args), labels).backward()
    for (name, p), q in zip(dense.named_parameters(), flex.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def _assert_half_as_close(device: str, amp_dtypes: tuple[torch.dtype, ...], *shape: Any) -> None:
    """Under autocast, flex differs from dense by at most twice dense's own distance to float32: both round
    the same products, so flex must not add an error of its own."""
    dense, flex = _model("dinov2").to(device), _model("dinov2", "flex").to(device)
    args = [a.to(device) for a in _inputs(dense, *shape)]
    with torch.no_grad():
        exact = dense(*args)
        for amp_dtype in amp_dtypes:
            with torch.autocast(device, dtype=amp_dtype):
                half_dense, half_flex = dense(*args).float(), flex(*args).float()
            dense_error = (half_dense - exact).abs().max().item()
            assert dense_error < 0.1 * exact.abs().max().item(), amp_dtype  # the half path itself is sound
            assert (half_flex - half_dense).abs().max().item() <= 2 * dense_error + 1e-3, amp_dtype


def test_bfloat16_autocast_flex_on_cpu() -> None:
    _assert_half_as_close("cpu", (torch.bfloat16,), 3, 150, 40, [150, 1, 75], [40, 40, 1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_flex_matches_dense() -> None:
    """float16 / bfloat16 autocast at the specs' 600 / 50 descriptors, as the AMES half-precision test."""
    q_real = [600, 300, 1, 600, 600, 17, 600, 5]
    _assert_half_as_close("cuda", (torch.float16, torch.bfloat16), 8, 600, 50, q_real, [50] * 7 + [1])
