"""Run test code under the Triton interpreter, in a subprocess: Triton reads ``TRITON_INTERPRET`` when a kernel
is made, so the variable must be set before anything of objretrieval.kernels is used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(call: str, *, timeout: float = 300) -> str:
    """Run ``call`` (Python source, e.g. ``"from tests.test_x import checks; checks()"``) with
    ``TRITON_INTERPRET=1`` and one thread, from the repository root; fail with its output unless it exits 0.
    Returns its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", call], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
