"""The fused AVSL distance: the torch reference (here) and the Triton kernel (under the interpreter, in one
subprocess, since Triton reads TRITON_INTERPRET when the kernel is defined) against the model's own path
(:class:`AttributableSimilarity`, :class:`AVSLScorer`) and the spec's formula written out in float64."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from objretrieval.kernels.avsl import avsl_distance
from objretrieval.models import AVSL, AttributableSimilarity, AVSLFeatures, AVSLScorer
from objretrieval.search import pairwise_knn
from tests.interpreter import run_interpreted
from tests.test_avsl import _naive_distance

ROOT = Path(__file__).resolve().parents[1]

# (name, levels, dim, rows, cols, p, dtype): odd sizes, tails of every tile and block (8 x 8 pairs, blocks of
# 32 / 64 nodes), more tiles than the interpreter's 3 persistent programs, 2 to 4 levels (0, 1, 2 scratch
# buffers), p = 1, 2, 3, half-precision features
CASES = [
    ("tails_3_levels", 3, 70, 13, 19, 2.0, torch.float32),
    ("two_levels", 2, 37, 5, 9, 2.0, torch.float32),
    ("four_levels", 4, 40, 9, 11, 2.0, torch.float32),
    ("p1_one_row", 3, 33, 1, 17, 1.0, torch.float32),
    ("p3", 3, 20, 7, 3, 3.0, torch.float32),
    ("float16", 3, 70, 13, 19, 2.0, torch.float16),
    ("bfloat16", 3, 24, 6, 10, 2.0, torch.bfloat16),
]
RTOL, ATOL = 1e-5, 1e-6


def _similarity(levels: int, dim: int, p: float, seed: int = 0) -> AttributableSimilarity:
    """A trained-looking graph: random links (top-7 kept), reliabilities that saturate both ways."""
    sim = AttributableSimilarity(dim, num_levels=levels, topk=7, p=p)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sim.links.copy_(torch.randn(sim.links.shape, generator=g))
        sim.num_link_updates.fill_(1)
        sim.reliability_scale.copy_(torch.randn(sim.reliability_scale.shape, generator=g))
        sim.reliability_bias.copy_(0.3 * torch.randn(sim.reliability_bias.shape, generator=g))
    return sim


def _features(n: int, levels: int, dim: int, dtype: torch.dtype, seed: int) -> AVSLFeatures:
    g = torch.Generator().manual_seed(seed)
    return AVSLFeatures(
        tuple(torch.randn(n, dim, generator=g).to(dtype) for _ in range(levels)),
        tuple((1.5 * torch.rand(n, dim, generator=g)).to(dtype) for _ in range(levels)),
    )


def _case(case: tuple) -> tuple[AttributableSimilarity, AVSLFeatures, AVSLFeatures]:
    _, levels, dim, rows, cols, p, dtype = case
    return (
        _similarity(levels, dim, p),
        _features(rows, levels, dim, dtype, 1),
        _features(cols, levels, dim, dtype, 2),
    )


def _check_case(case: tuple, backend: str, device: str = "cpu") -> None:
    """Every entry point of the fused distance against the model's own path; AssertionError names the case."""
    name = case[0]
    sim, a, b = _case(case)
    sim, a, b = sim.to(device), a.to(device), b.to(device)
    with torch.no_grad():
        want = sim(a, b).final  # the model's torch path, unchanged
        got = avsl_distance(sim, a, b, backend=backend, chunk_size=4)
        assert got.shape == want.shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=name)
        torch.testing.assert_close(sim(a, b, backend=backend).final, want, rtol=RTOL, atol=ATOL, msg=name)
        # paired: row i against column i only
        n = min(len(a), len(b))
        a_n, b_n = a.rows(slice(0, n)), b.rows(slice(0, n))
        paired = avsl_distance(sim, a_n, b_n, paired=True, backend=backend)
        torch.testing.assert_close(paired, want[:n, :n].diagonal(), rtol=RTOL, atol=ATOL, msg=name)
        none = a.rows(slice(0, 0))  # no rows: an empty result, as the model's path gives
        assert avsl_distance(sim, none, b, backend=backend).shape == sim(none, b).final.shape == (0, len(b))


def _check_scorer(backend: str, device: str = "cpu") -> None:
    """AVSLScorer's full matrix, exact top-k and shortlist-then-rescore paths, kernel against torch."""
    sim = _similarity(3, 48, 2.0, seed=3).to(device)
    feats = _features(23, 3, 48, torch.float32, 4).to(device)
    torch_scorer = AVSLScorer(sim, feats)
    scorer = AVSLScorer(sim, feats, backend=backend)
    full = torch_scorer.full_scores()
    torch.testing.assert_close(scorer.full_scores(block_size=5), full, rtol=RTOL, atol=ATOL)
    # the test data has no near-ties around the 5th neighbour, so the rankings must agree exactly
    top = (full - torch.diag(torch.full((23,), float("inf"), device=device))).sort(dim=1, descending=True)
    assert float((top.values[:, :6].diff(dim=1).abs()).min()) > 1e-3
    want = pairwise_knn(torch_scorer, 5, exclude_self=True)
    got = pairwise_knn(scorer, 5, exclude_self=True, query_block_size=7, gallery_block_size=9)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.scores, want.scores, rtol=RTOL, atol=ATOL)
    shortlist = torch_scorer.shortlist(12)
    want = pairwise_knn(torch_scorer, 5, candidates=shortlist)
    got = pairwise_knn(scorer, 5, candidates=shortlist, pair_chunk_size=50)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.scores, want.scores, rtol=RTOL, atol=ATOL)
    # query vs gallery, through AVSL.distance
    gallery = _features(10, 3, 48, torch.float32, 5).to(device)
    model = AVSL(None, in_channels=(4, 4, 4), embed_dim=48).eval()
    model.similarity = sim
    blocks = model.distance(feats, gallery, backend=backend)
    torch.testing.assert_close(blocks, -AVSLScorer(sim, feats, gallery).full_scores(), rtol=RTOL, atol=ATOL)


def _check_gradients_refused(backend: str) -> None:
    sim, a, b = _case(CASES[0])
    with pytest.raises(RuntimeError, match="inference only"):
        avsl_distance(sim, a, b, backend=backend)  # the reliabilities require grad
    with pytest.raises(RuntimeError, match="inference only"):
        sim(a, b, backend="triton")
    with torch.inference_mode():
        torch.testing.assert_close(avsl_distance(sim, a, b, backend=backend), sim(a, b).final)


def triton_checks() -> None:
    """Every check on the Triton kernel; run by :func:`test_triton_kernel_under_interpreter` in a subprocess."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import objretrieval.kernels.avsl as kernel_module

    for case in CASES:
        _check_case(case, "triton")
    launches: list[bool] = []  # the paired flag of each launch: the scorer's routes do reach the kernel
    launch = kernel_module._triton_distances
    kernel_module._triton_distances = lambda ops, paired: launches.append(paired) or launch(ops, paired)
    _check_scorer("triton")
    assert True in launches and False in launches
    _check_gradients_refused("triton")
    print("avsl triton checks passed:", len(CASES) + 2)


def test_triton_kernel_under_interpreter() -> None:
    out = run_interpreted("from tests.test_kernels_avsl import triton_checks; triton_checks()")
    assert f"avsl triton checks passed: {len(CASES) + 2}" in out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_reference_matches_the_model(case: tuple) -> None:
    _check_case(case, "torch")


def test_torch_reference_follows_the_formula() -> None:
    """Against the spec's formula node by node in float64 (tests/test_avsl.py's), not against our own code."""
    sim = _similarity(3, 12, 2.0)
    sim.topk = 5
    a, b = _features(4, 3, 12, torch.float32, 6), _features(3, 3, 12, torch.float32, 7)
    with torch.no_grad():
        got = avsl_distance(sim, a, b, chunk_size=3)
        expected = [[_naive_distance(sim, a, b, i, j) for j in range(3)] for i in range(4)]
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def test_scorer_with_torch_backend() -> None:
    _check_scorer("torch")


def test_gradients_are_refused_but_auto_keeps_training_working(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sim, a, b = _case(CASES[0])
    with pytest.raises(RuntimeError, match="inference only"):
        avsl_distance(sim, a, b)
    # auto with gradients needed: the model's own path, per-level matrices and gradients included
    auto, plain = sim(a, b, backend="auto"), sim(a, b)
    assert len(auto.levels) == 3 and torch.equal(auto.final, plain.final)
    auto.final.sum().backward()
    assert sim.reliability_scale.grad is not None


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sim, a, b = _case(CASES[1])
    with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        avsl_distance(sim, a, b, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        AVSLScorer(sim, a, backend="triton")
    with torch.no_grad():  # auto on CPU: the torch path
        assert torch.equal(sim(a, b, backend="auto").final, sim(a, b).final)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"paired": True}, ValueError, "paired needs as many rows as cols, got 5 and 9"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, error: type[Exception], match: str) -> None:
    sim, a, b = _case(CASES[1])
    with torch.no_grad(), pytest.raises(error, match=match):
        avsl_distance(sim, a, b, **kwargs)


def test_bad_features_are_refused() -> None:
    sim, a, b = _case(CASES[1])  # 2 levels of 37 nodes
    with torch.no_grad():
        with pytest.raises(ValueError, match="rows must have 2 levels"):
            avsl_distance(sim, _features(5, 3, 37, torch.float32, 0), b)
        with pytest.raises(ValueError, match=r"cols level 0: embeddings and certainties must be \(9, 37\)"):
            avsl_distance(sim, a, _features(9, 2, 36, torch.float32, 0))
        with pytest.raises(ValueError, match="rows and cols must be on one device"):
            avsl_distance(sim, a, b.to("meta"))
        with pytest.raises(ValueError, match=r"weights must be \(1, 37, 37\) propagation weights"):
            avsl_distance(sim, a, b, torch.zeros(1, 37, 36))
        with pytest.raises(ValueError, match="backend"):
            sim(a, b, backend="gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_cuda_kernel_matches_the_model(backend: str) -> None:
    """Float32, float16 and bfloat16 features (the cases above), the scorer paths, and an E = 512 graph."""
    for case in CASES:
        _check_case(case, backend, "cuda")
    _check_scorer(backend, "cuda")
    _check_case(("paper_size", 3, 512, 70, 150, 2.0, torch.float32), backend, "cuda")
