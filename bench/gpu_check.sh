#!/usr/bin/env bash
# GPU check of fastpmd.kernels, one command on a CUDA machine (run from the repository root):
#   bash bench/gpu_check.sh            # correctness tests (compiled kernels, no interpreter) + timing table
#   SIZE="--n 4096" bash bench/gpu_check.sh   # smaller timing problem
# 1. pytest tests/test_kernels*.py without TRITON_INTERPRET: the same float64-reference tests, compiled for the GPU.
# 2. python -m fastpmd.bench.gpu_timing: ms, TFLOP/s and % of dense peak for the fused loss (triton vs torch).
set -u -o pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: no CUDA device visible" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
status=0
python -m pytest -q -p no:cacheprovider tests/test_kernels*.py || status=1
python -m fastpmd.bench.gpu_timing ${SIZE:-} --json "${OUT:-/tmp}/gpu_timing.json" || status=1
exit $status
