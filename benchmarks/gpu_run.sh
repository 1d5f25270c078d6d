#!/usr/bin/env bash
# The GPU run of issue 14, in one command (about 8 minutes on an H200):
#   1. every CUDA test (`pytest -m cuda`): kernels in bf16/fp16 against their torch references, the AMES
#      half-precision and compiled FlexAttention paths, nccl, bf16-exact search on CUDA;
#   2. benchmarks/bench_kernels.py --device cuda: each kernel against its torch/cuBLAS reference, ratios and
#      fractions of the H200's peaks, ending with a RESULT line.
# Logs go to $OUT (or ./gpu_run_logs). Copy the printed `hint:` lines into
# objretrieval/kernels/dispatch.py MEASURED, with the date, to let backend="auto" pick the faster kernels.
set -u
out="${OUT:-gpu_run_logs}"
mkdir -p "$out"
run() { if command -v uv >/dev/null; then uv run --group bench "$@"; else "$@"; fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run python -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/pytest_cuda.txt"
run python benchmarks/bench_kernels.py --device cuda 2>&1 | tee "$out/bench_kernels.txt"
