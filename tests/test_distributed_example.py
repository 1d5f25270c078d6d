"""``examples/ddp_train.py`` runs under torchrun: 2 processes (gloo on CPU), rank 0 reporting once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.spawn import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = ("examples/ddp_train.py", "--epochs", "2", "--steps", "3", "--per-class", "4")
ROW = re.compile(r"^(untrained|epoch \d+)\s+([\d.\s]+)$")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _rows(stdout: str) -> list[tuple[str, list[float]]]:
    return [(m[1], [float(v) for v in m[2].split()]) for m in map(ROW.match, stdout.splitlines()) if m]


def _check_report(stdout: str, processes: int) -> None:
    rows = _rows(stdout)
    # rank 0 alone prints: one table row per evaluation, whatever the number of processes
    assert [name for name, _ in rows] == ["untrained", "epoch 1"], stdout
    untrained, trained = rows[0][1], rows[1][1]
    assert len(untrained) == 5 and len(trained) == 6, stdout  # 5 metrics, and the loss after training
    assert all(0.0 <= v <= 100.0 for v in untrained + trained[:5]), stdout
    assert trained[:4] == sorted(trained[:4]), stdout  # Recall@1 <= @2 <= @4 <= @8
    assert stdout.count(f"{processes} process(es)") == 1, stdout
    assert len(re.findall(r"^recall@1 [\d.]+ -> [\d.]+, map@r .* after 3 steps", stdout, re.M)) == 1, stdout


def test_ddp_example_runs_under_torchrun_on_two_processes() -> None:
    launch = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()))
    result = _run(*launch, *QUICK)
    assert result.returncode == 0, result.stdout + result.stderr
    _check_report(result.stdout, processes=2)
    assert "(gloo)" in result.stdout or "(nccl)" in result.stdout, result.stdout
