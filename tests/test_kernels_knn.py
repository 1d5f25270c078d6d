"""Fused similarity + top-k: the torch reference against float64 brute force, and the Triton kernel (under the
interpreter, in a subprocess, since Triton reads TRITON_INTERPRET when the kernel is made) against the
reference: identical on data whose scores are exact (small integers), to float32 rounding elsewhere."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from objretrieval.kernels import knn as knn_module
from objretrieval.kernels.knn import MAX_K, fused_topk, reference_topk
from tests.interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[1]
#: Scores closer than this (unit-scale data) count as near-ties: their order may differ between float32 sums.
NEAR = 1e-4


class Case(NamedTuple):
    name: str
    num_q: int
    num_g: int
    dim: int
    k: int
    dtype: torch.dtype
    kind: str  # "int": small integers (exact scores, many ties), "gauss": unit-normalised Gaussian rows
    metric: str  # "ip" or "l2"
    exclude: str  # "none", "loo" (query r skips gallery row r + col_offset) or "random"
    col_offset: int = 0
    num_chunks: int | None = None


CASES = [
    Case("ip_tail", 5, 50, 8, 3, torch.float32, "gauss", "ip", "none"),
    Case("k1_ties_f16", 6, 40, 8, 1, torch.float16, "int", "ip", "none"),
    Case("ties_f16_chunks", 9, 130, 24, 10, torch.float16, "int", "ip", "none", 0, 2),
    Case("query_tail_random_exclude", 70, 150, 8, 5, torch.float32, "int", "ip", "random", 0, 3),
    Case("l2_loo_offset_many_tiles", 7, 300, 20, 70, torch.float32, "int", "l2", "loo", 1000, 1),
    Case("l2_gauss_f16", 8, 90, 40, 20, torch.float16, "gauss", "l2", "none"),
    Case("k_above_tile", 6, 200, 40, 130, torch.float16, "gauss", "ip", "random", 0, 2),
    Case("k_equals_n_loo", 4, 97, 12, 97, torch.float32, "int", "l2", "loo"),
    Case("one_row_excluded", 3, 1, 8, 1, torch.float32, "int", "ip", "loo"),
    Case("long_stream_few_merges", 5, 1200, 8, 5, torch.float32, "gauss", "ip", "none", 0, 1),
    Case("max_k_ties", 3, 4500, 4, MAX_K, torch.float16, "int", "ip", "random"),
]


def _inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(queries, gallery, keyword arguments) of a case, on CPU."""
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_g = (case.num_q, case.dim), (case.num_g, case.dim)
    if case.kind == "int":
        queries = torch.randint(-2, 3, shape_q, generator=g).float()
        gallery = torch.randint(-2, 3, shape_g, generator=g).float()
        half = case.num_g // 2
        if half:  # duplicated rows: exact ties that only the index can order
            gallery[half:] = gallery[torch.randint(0, half, (case.num_g - half,), generator=g)]
    else:
        queries = torch.nn.functional.normalize(torch.randn(shape_q, generator=g), dim=1)
        gallery = torch.nn.functional.normalize(torch.randn(shape_g, generator=g), dim=1)
    queries, gallery = queries.to(case.dtype), gallery.to(case.dtype)
    kwargs: dict[str, Any] = {"col_offset": case.col_offset}
    if case.metric == "l2":
        kwargs["query_sq_norms"] = queries.float().pow(2).sum(1)
        kwargs["gallery_sq_norms"] = gallery.float().pow(2).sum(1)
    if case.exclude == "loo":
        kwargs["exclude"] = torch.arange(case.num_q) % case.num_g + case.col_offset
    elif case.exclude == "random":  # some -1 (none), some outside this gallery, most inside
        kwargs["exclude"] = torch.randint(-1, case.num_g + 3, (case.num_q,), generator=g) + case.col_offset
        kwargs["exclude"][kwargs["exclude"] == case.col_offset - 1] = -1
    return queries, gallery, kwargs


def brute_force(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) in float64 by numpy: all scores, excluded columns dropped, sorted by (score desc,
    index asc), padded with (-inf, -1) where fewer than k columns are left."""
    q, g = queries.double().numpy(), gallery.double().numpy()
    scores = q @ g.T
    if kwargs.get("query_sq_norms") is not None:
        scores = 2 * scores - (g**2).sum(1)[None, :] - (q**2).sum(1)[:, None]
    offset = kwargs.get("col_offset", 0)
    exclude = kwargs.get("exclude")
    out_s = np.full((len(q), k), -np.inf)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for r in range(len(q)):
        cols = np.arange(len(g))
        if exclude is not None:
            cols = cols[cols + offset != int(exclude[r])]
        order = cols[np.lexsort((cols, -scores[r, cols]))][:k]
        out_s[r, : len(order)], out_i[r, : len(order)] = scores[r, order], order + offset
    return out_s, out_i


def _assert_same_ranking(
    scores: torch.Tensor,
    indices: torch.Tensor,
    want_scores: np.ndarray,
    want_indices: np.ndarray,
    exact: bool,
    name: str,
) -> None:
    """Equal results if ``exact``; else scores to float32 rounding and indices wherever the wanted scores
    have no near-tie (a gap below :data:`NEAR` to a neighbouring slot)."""
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64, name
    assert scores.shape == indices.shape == want_scores.shape, name
    got_s, got_i = scores.cpu().double().numpy(), indices.cpu().numpy()
    assert not np.signbit(got_s[got_s == 0]).any(), f"{name}: -0.0 score"
    if exact:
        np.testing.assert_array_equal(got_i, want_indices, err_msg=name)
        np.testing.assert_array_equal(got_s, want_scores, err_msg=name)
        return
    np.testing.assert_allclose(got_s, want_scores, rtol=0, atol=1e-5, err_msg=name)
    gaps = np.abs(np.diff(want_scores, axis=1))
    clear = np.ones_like(want_indices, dtype=bool)
    clear[:, 1:] &= gaps > NEAR
    clear[:, :-1] &= gaps > NEAR
    clear[:, -1] = False  # the (k+1)-th score is unknown here: the last slot may be a near-tie with it
    np.testing.assert_array_equal(got_i[clear], want_indices[clear], err_msg=name)


def _check_case(case: Case, backend: str) -> None:
    """One case on ``backend`` against the torch reference, and the reference against brute force."""
    queries, gallery, kwargs = _inputs(case)
    exact = case.kind == "int"
    want = reference_topk(queries, gallery, case.k, **kwargs)
    if backend == "torch":
        _assert_same_ranking(*want, *brute_force(queries, gallery, case.k, **kwargs), exact, case.name)
    got = fused_topk(queries, gallery, case.k, backend=backend, num_chunks=case.num_chunks, **kwargs)
    _assert_same_ranking(*got, want[0].double().numpy(), want[1].numpy(), exact, case.name)


def _check_strided_views(backend: str) -> None:
    """Row-sliced queries and a column-major gallery give the result of contiguous copies."""
    g = torch.Generator().manual_seed(5)
    queries = torch.randint(-2, 3, (24, 16), generator=g).half()[::3]
    gallery = torch.randint(-2, 3, (16, 75), generator=g).half().T
    got = fused_topk(queries, gallery, 9, backend=backend)
    want = reference_topk(queries.contiguous(), gallery.contiguous(), 9)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def triton_checks() -> None:
    """Every case on the Triton kernel; run by :func:`test_triton_kernel_under_interpreter` in a subprocess."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in CASES:
        _check_case(case, "triton")
    _check_strided_views("triton")
    print("triton checks passed:", len(CASES) + 1)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_torch_reference_matches_brute_force(case: Case) -> None:
    _check_case(case, "torch")


def test_strided_views() -> None:
    _check_strided_views("torch")


def test_reference_streams_blocks() -> None:
    """More gallery rows than one reference block (4096), many ties: the brute-force order."""
    queries, gallery, kwargs = _inputs(Case("big", 3, 4100, 4, 50, torch.float32, "int", "ip", "loo"))
    got = reference_topk(queries, gallery, 50, **kwargs)
    _assert_same_ranking(*got, *brute_force(queries, gallery, 50, **kwargs), True, "big")


def test_excluded_columns_leave_missing_slots() -> None:
    """k = N with leave-one-out: the last slot of every row is missing (-inf, -1), never the excluded row."""
    gallery = torch.eye(4)
    scores, indices = fused_topk(gallery, gallery, 4, exclude=torch.arange(4), backend="torch")
    assert torch.equal(indices[:, -1], torch.full((4,), -1)) and bool((scores[:, -1] == -float("inf")).all())
    assert not bool((indices == torch.arange(4)[:, None]).any())


def test_triton_kernel_under_interpreter() -> None:
    out = run_interpreted("from tests.test_kernels_knn import triton_checks; triton_checks()")
    assert f"triton checks passed: {len(CASES) + 1}" in out


#: Pointer types of the kernel's tensor arguments in a Triton signature.
_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
}


@pytest.mark.parametrize(
    ("dtype", "k", "metric", "exclude"),
    [(torch.bfloat16, 100, "l2", "loo"), (torch.float32, 5, "ip", "none")],
    ids=["bf16-l2-exclude", "fp32-ip"],
)
def test_kernel_compiles_for_hopper(dtype: torch.dtype, k: int, metric: str, exclude: str) -> None:
    """The interpreter runs the kernel as Python; this compiles it for sm_90 with Triton's own ptxas (no GPU
    needed), which refuses what only the compiler checks (constexpr rules, types, layouts, the assembler)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1" or "nvidia" not in triton.backends.backends:
        pytest.skip("needs Triton's CUDA backend, outside the interpreter")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    queries, gallery, kwargs = _inputs(Case("compile", 40, 300, 96, k, dtype, "gauss", metric, exclude))
    q_sq, g_sq = kwargs.get("query_sq_norms"), kwargs.get("gallery_sq_norms")
    _, args, meta = knn_module._launch(queries, gallery, k, q_sq, g_sq, kwargs.get("exclude"), None)
    kernel = knn_module._triton_kernel()
    names = list(inspect.signature(kernel.fn).parameters)
    options = {key: meta.pop(key) for key in ("num_warps", "enable_fp_fusion")}
    signature = {
        name: _POINTER_TYPES[a.dtype] if isinstance(a, torch.Tensor) else "i32"
        for name, a in zip(names, args, strict=False)  # the constexprs follow
    }
    signature.update(dict.fromkeys(meta, "constexpr"))
    constexprs = {(names.index(name),): value for name, value in meta.items()}
    source = ASTSource(fn=kernel, signature={n: signature[n] for n in names}, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"]


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_topk(x, x, 2, backend="triton")
    assert fused_topk(x, x, 2)[1].shape == (5, 2)  # the default is the torch reference


def test_auto_uses_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so the Triton path would raise if auto took it
    queries, gallery, kwargs = _inputs(CASES[3])
    auto = fused_topk(queries, gallery, 5, backend="auto", **kwargs)
    ref = reference_topk(queries, gallery, 5, **kwargs)
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])


_X, _G = torch.zeros(3, 4), torch.zeros(5, 4)
_NAN = torch.zeros(5, 4)
_NAN[2, 1] = float("nan")
BAD = [
    ({"queries": _X.double()}, TypeError, "queries must be float32, float16 or bfloat16"),
    ({"queries": torch.zeros(3, 4, dtype=torch.int32)}, TypeError, "queries must have a floating dtype"),
    ({"gallery": _G.half()}, TypeError, "gallery must have the queries' dtype"),
    ({"gallery": torch.zeros(5, 3)}, ValueError, "gallery rows must have the queries' dimension 4"),
    ({"queries": torch.zeros(4)}, ValueError, "queries must be 2-D"),
    ({"gallery": torch.zeros(0, 4)}, ValueError, "gallery is empty"),
    ({"gallery": _NAN}, ValueError, "gallery contains NaN or inf values \\(first at row 2\\)"),
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": 6}, ValueError, "k must be at most min\\(gallery rows, MAX_K\\) = 5"),
    ({"k": 2.0}, TypeError, "k must be an int"),
    ({"gallery": torch.zeros(MAX_K + 1, 4), "k": MAX_K + 1}, ValueError, f"= {MAX_K}, got {MAX_K + 1}"),
    ({"query_sq_norms": torch.zeros(3)}, ValueError, "must be given together"),
    ({"gallery_sq_norms": torch.zeros(5)}, ValueError, "must be given together"),
    (
        {"query_sq_norms": torch.zeros(3, dtype=torch.float64), "gallery_sq_norms": torch.zeros(5)},
        TypeError,
        "query_sq_norms must be a float32 tensor",
    ),
    (
        {"query_sq_norms": torch.zeros(3), "gallery_sq_norms": torch.zeros(4)},
        ValueError,
        "gallery_sq_norms must have shape \\(5,\\)",
    ),
    (
        {"query_sq_norms": torch.tensor([0.0, float("inf"), 0.0]), "gallery_sq_norms": torch.zeros(5)},
        ValueError,
        "query_sq_norms contains NaN",
    ),
    ({"exclude": torch.zeros(2, dtype=torch.int64)}, ValueError, "exclude has 2 entries, expected 3"),
    ({"exclude": torch.zeros(3)}, TypeError, "exclude must have an integer dtype"),
    ({"exclude": torch.tensor([0, -2, 1])}, ValueError, "exclude must hold gallery indices or -1"),
    ({"col_offset": -1}, ValueError, "col_offset must be >= 0"),
    ({"num_chunks": 0}, ValueError, "num_chunks must be >= 1"),
    ({"backend": "cuda"}, ValueError, "backend must be one of"),
]


FUSED_ONLY = ("backend", "num_chunks")  # arguments the reference does not take
BAD_CALLS = [
    pytest.param(entry, change, error, match, id=f"{entry}-{i}")
    for entry in ("reference", "torch", "triton")
    for i, (change, error, match) in enumerate(BAD)
    if entry != "reference" or not set(change) & set(FUSED_ONLY)
]


@pytest.mark.parametrize(("entry", "change", "error", "match"), BAD_CALLS)
def test_bad_input_is_refused(entry: str, change: dict, error: type[Exception], match: str) -> None:
    """Every path checks its arguments before any work (the Triton path too, before its device check)."""
    args = {"queries": _X, "gallery": _G, "k": 2, **change}
    if entry == "reference":
        call = reference_topk
    else:
        args.setdefault("backend", entry)
        call = fused_topk
    with pytest.raises(error, match=match):
        call(**args)


def _check_cuda(dtype: torch.dtype, k: int, metric: str, exclude: bool) -> None:
    """300 queries against 10,000 x 128, against the reference on the GPU, with default and 5 chunks."""
    g = torch.Generator(device="cuda").manual_seed(k)
    gallery = torch.nn.functional.normalize(torch.randn(10_000, 128, device="cuda", generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(300, 128, device="cuda", generator=g), dim=1)
    queries, gallery = queries.to(dtype), gallery.to(dtype)
    kwargs: dict[str, Any] = {"col_offset": 7}
    if metric == "l2":
        kwargs["query_sq_norms"] = queries.float().pow(2).sum(1)
        kwargs["gallery_sq_norms"] = gallery.float().pow(2).sum(1)
    if exclude:
        kwargs["exclude"] = torch.arange(300, device="cuda") * 3 + 7
    want_s, want_i = reference_topk(queries, gallery, k, **kwargs)
    for chunks in (None, 5):
        got = fused_topk(queries, gallery, k, num_chunks=chunks, backend="triton", **kwargs)
        assert got[0].is_cuda and got[1].is_cuda
        name = f"{dtype} k={k} {metric} exclude={exclude} chunks={chunks}"
        _assert_same_ranking(*got, want_s.double().cpu().numpy(), want_i.cpu().numpy(), False, name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "k", "metric", "exclude"),
    [
        (torch.bfloat16, 100, "ip", False),
        (torch.bfloat16, 1024, "l2", True),
        (torch.bfloat16, 4096, "ip", True),
        (torch.float16, 100, "l2", True),
        (torch.float16, 4096, "l2", False),
        (torch.float32, 1024, "ip", False),
    ],
)
def test_cuda_kernel_matches_reference(
    dtype: torch.dtype, k: int, metric: str, exclude: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few combinations: each compiles its own kernel (about as long as the check itself)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a float32 reference, as the kernel
    _check_cuda(dtype, k, metric, exclude)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cases_and_devices() -> None:
    """The interpreter's cases compiled for the GPU, and the device checks."""
    for case in CASES:
        queries, gallery, kwargs = _inputs(case)
        on_gpu = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
        got = fused_topk(
            queries.cuda(), gallery.cuda(), case.k, num_chunks=case.num_chunks, backend="triton", **on_gpu
        )
        want = reference_topk(queries, gallery, case.k, **kwargs)
        _assert_same_ranking(
            got[0], got[1], want[0].double().numpy(), want[1].numpy(), case.kind == "int", case.name
        )
    x = torch.zeros(3, 4, device="cuda")
    with pytest.raises(ValueError, match="gallery must be on the queries' device"):
        fused_topk(x, x.cpu(), 2)
    with pytest.raises(ValueError, match="exclude must be on the queries' device"):
        fused_topk(x, x, 2, exclude=torch.zeros(3, dtype=torch.int64))
