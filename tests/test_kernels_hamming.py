"""Hamming top-k over packed codes: the torch reference and the Triton kernel (under the interpreter, in a
subprocess, since Triton reads TRITON_INTERPRET when the kernel is defined) against numpy brute force and the
±1 matmul identity ``hamming = (d - <a, b>) / 2``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from objretrieval.kernels import hamming_distances, hamming_topk
from objretrieval.kernels.hamming import DEFAULT_BLOCK_SIZE
from tests.interpreter import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

# (name, Q, N, words, dtype, k, block_size, kind)
CASES = [
    ("tail", 7, 53, 16, torch.uint8, 5, 16, "random"),
    ("n_below_block", 3, 10, 16, torch.uint8, 4, 64, "random"),
    ("k_above_block", 5, 40, 8, torch.uint8, 25, 8, "random"),
    ("k_equals_n_odd_bytes", 4, 19, 3, torch.uint8, 19, 7, "random"),
    ("ties_sparse_duplicates", 6, 60, 16, torch.uint8, 12, 16, "ties"),
    ("extremes_512_bits", 4, 21, 64, torch.uint8, 9, 8, "extremes"),
    ("int32_words", 5, 33, 4, torch.int32, 6, 10, "random"),
    ("int64_words_ties", 5, 33, 2, torch.int64, 10, 10, "ties"),
]


def _codes(num: int, words: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """Packed codes; ``ties``: few bits set and duplicated rows, ``extremes``: all-zero and all-one rows too."""
    g = torch.Generator().manual_seed(seed)
    nbytes = words * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (num, nbytes), dtype=torch.uint8, generator=g)
    if kind == "ties":
        raw = raw * (torch.rand(num, nbytes, generator=g) < 0.05)  # ~1 bit in 20 bytes: many equal distances
        raw[num // 2 :] = raw[torch.randint(0, num // 2, (num - num // 2,), generator=g)]
    if kind == "extremes":
        raw[0::3], raw[1::5] = 0, 255
    return raw.view(dtype)


def _as_bits(codes: torch.Tensor) -> np.ndarray:
    """(n, d) 0/1 bits of the codes' bytes, by numpy (bit order is irrelevant to a Hamming distance)."""
    return np.unpackbits(codes.contiguous().numpy().view(np.uint8), axis=1)


def _check_case(case: tuple, backend: str, device: str = "cpu") -> None:
    """Distances and top-k of one case against brute force; raises AssertionError with the case's name."""
    name, num_q, num_n, words, dtype, k, block_size, kind = case
    queries, database = _codes(num_q, words, dtype, kind, 1), _codes(num_n, words, dtype, kind, 2)
    if kind == "ties":
        queries[: num_q // 2] = database[: num_q // 2]  # distance-0 ties with duplicated database rows
    qbits, dbits = _as_bits(queries), _as_bits(database)
    brute = (qbits[:, None, :] != dbits[None, :, :]).sum(-1)
    signs_q, signs_db = 2.0 * qbits - 1.0, 2.0 * dbits - 1.0
    identity = (qbits.shape[1] - signs_q @ signs_db.T) / 2  # float64, exact for these sizes
    queries, database = queries.to(device), database.to(device)
    distances = hamming_distances(queries, database, backend=backend).cpu()
    assert distances.dtype == torch.int32, name
    np.testing.assert_array_equal(distances.numpy(), brute, err_msg=name)
    np.testing.assert_array_equal(distances.numpy().astype(np.float64), identity, err_msg=name)
    order = np.argsort(brute, axis=1, kind="stable")[:, :k]  # ties to the lower database index
    scores, indices = hamming_topk(queries, database, k, backend=backend, block_size=block_size)
    scores, indices = scores.cpu(), indices.cpu()
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64, name
    np.testing.assert_array_equal(indices.numpy(), order, err_msg=name)
    np.testing.assert_array_equal(scores.numpy(), np.take_along_axis(brute, order, 1), err_msg=name)
    assert not bool(torch.signbit(scores).any()), name  # no -0.0 for a distance of 0


def _noncontiguous_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries, database) views with odd strides and offsets, and contiguous copies of them."""
    g = torch.Generator().manual_seed(3)
    buffer = torch.randint(0, 256, (40, 19), dtype=torch.uint8, generator=g)
    queries = buffer[1::3, 1:17]  # row stride 57, storage offset 20: not word-aligned
    database = torch.randint(0, 256, (16, 45), dtype=torch.uint8, generator=g).T  # column-major
    return queries, database, queries.contiguous(), database.contiguous()


def _check_noncontiguous(backend: str) -> None:
    queries, database, q_copy, db_copy = _noncontiguous_inputs()
    got = hamming_topk(queries, database, 7, backend=backend, block_size=16)
    want = hamming_topk(q_copy, db_copy, 7, backend="torch", block_size=45)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)
    brute = (_as_bits(q_copy)[:, None] != _as_bits(db_copy)[None]).sum(-1)
    np.testing.assert_array_equal(hamming_distances(queries, database, backend=backend).numpy(), brute)


def triton_checks() -> None:
    """Every case on the Triton kernel; run by :func:`test_triton_kernel_under_interpreter` in a subprocess."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for case in CASES:
        _check_case(case, "triton")
    _check_noncontiguous("triton")
    print("triton checks passed:", len(CASES) + 1)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_reference_is_exact(case: tuple) -> None:
    _check_case(case, "torch")


def test_noncontiguous_views() -> None:
    _check_noncontiguous("torch")


def test_default_block_streams_large_database() -> None:
    """More rows than one default block (many ties): streamed blocks give the brute-force stable order."""
    database = _codes(DEFAULT_BLOCK_SIZE + 37, 4, torch.uint8, "ties", 4)
    queries = database[-3:].clone()
    got = hamming_topk(queries, database, 20)
    brute = (_as_bits(queries)[:, None] != _as_bits(database)[None]).sum(-1)
    order = np.argsort(brute, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(got.indices.numpy(), order)
    np.testing.assert_array_equal(got.scores.numpy(), np.take_along_axis(brute, order, 1))


def test_numpy_codes_accepted() -> None:
    database = _codes(12, 16, torch.uint8, "random", 5)
    from_numpy = hamming_topk(database.numpy()[:2], database.numpy(), 3)
    assert torch.equal(from_numpy.indices, hamming_topk(database[:2], database, 3).indices)


def test_triton_kernel_under_interpreter() -> None:
    out = run_interpreted("from tests.test_kernels_hamming import triton_checks; triton_checks()")
    assert f"triton checks passed: {len(CASES) + 1}" in out


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    codes = _codes(8, 16, torch.uint8, "random", 6)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        hamming_topk(codes, codes, 2, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        hamming_distances(codes, codes, backend="triton")


def test_auto_uses_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # so the Triton path would raise if auto took it
    codes = _codes(9, 16, torch.uint8, "random", 7)
    auto, ref = hamming_topk(codes, codes, 4, backend="auto"), hamming_topk(codes, codes, 4)
    assert torch.equal(auto.indices, ref.indices) and torch.equal(auto.scores, ref.scores)


@pytest.mark.parametrize(
    ("queries", "database", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 16), torch.zeros(3, 16), {}, TypeError, "queries must hold packed codes"),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 8, dtype=torch.int16),
            {},
            TypeError,
            "database",
        ),
        (torch.zeros(2, 16, dtype=torch.bool), torch.zeros(3, 16, dtype=torch.bool), {}, TypeError, "uint8"),
        (torch.zeros(16, dtype=torch.uint8), torch.zeros(3, 16, dtype=torch.uint8), {}, ValueError, "2-D"),
        (
            torch.zeros(0, 16, dtype=torch.uint8),
            torch.zeros(3, 16, dtype=torch.uint8),
            {},
            ValueError,
            "queries",
        ),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 0, dtype=torch.uint8),
            {},
            ValueError,
            "database",
        ),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 8, dtype=torch.uint8),
            {},
            ValueError,
            "one width",
        ),
        (torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64), {}, ValueError, "dtype"),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 16, dtype=torch.uint8),
            {"k": 0},
            ValueError,
            "k",
        ),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 16, dtype=torch.uint8),
            {"k": 4},
            ValueError,
            "3",
        ),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 16, dtype=torch.uint8),
            {"k": 1.0},
            TypeError,
            "k",
        ),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 16, dtype=torch.uint8),
            {"block_size": 0},
            ValueError,
            "block_size",
        ),
        (
            torch.zeros(2, 16, dtype=torch.uint8),
            torch.zeros(3, 16, dtype=torch.uint8),
            {"backend": "cuda"},
            ValueError,
            "backend",
        ),
        (
            torch.zeros(1, 2**21 + 4, dtype=torch.uint8),
            torch.zeros(1, 2**21 + 4, dtype=torch.uint8),
            {},
            ValueError,
            "at most 16777216 bits",
        ),
    ],
)
def test_bad_input_is_refused(
    queries: torch.Tensor, database: torch.Tensor, kwargs: dict, error: type[Exception], match: str
) -> None:
    kwargs = {"k": 1, **kwargs}
    with pytest.raises(error, match=match):
        hamming_topk(queries, database, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_cuda_backends_are_exact(backend: str) -> None:
    for case in CASES:
        _check_case(case, backend, "cuda")
    codes = _codes(8, 16, torch.uint8, "random", 8)
    with pytest.raises(ValueError, match="one device"):
        hamming_topk(codes, codes.cuda(), 2, backend=backend)
