#!/usr/bin/env bash
# GPU check of fastpmd's kernels, one prepared command for a bare CUDA machine; sized for < 8 minutes on one
# H200 (run from anywhere; it works in the repository root):
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR default: $OUT, else /tmp/fastpmd-gpu-check
# Phases (each capped with `timeout`, elapsed time printed after each):
#   0. set-up (bench/gpu_env.sh): wheels in .whl/ for what the device lacks (liger-kernel, cut-cross-entropy),
#      fastpmd importable from the source tree; nvidia-smi.            ~10 s
#   1. pytest tests/kernels/test_kernels*.py with TRITON_INTERPRET unset: the float64-reference kernel tests, compiled
#      for this GPU (not test_kernels_report.py: it cross-compiles on the CPU, as CI does, in 1-2 minutes).
#                                                                      cap KERNEL_TESTS_S (default 150 s)
#   2. python -m fastpmd.bench.gpu_timing: N in {16384, 4096} (16384 first), H=3584, V=152064, bf16, hidden -> loss
#      forward+backward; fastpmd-cublas, fastpmd-triton, fastpmd-torch, Liger FLCE, Liger chunked GRPO, CCE (`cce` impl), naive
#      and the three matmuls (the floor) in one round-robin per N; ms (median, IQR), TFLOP/s, % of the floor's
#      speed, peak memory; PASS/FAIL lines for the targets.            cap TIMING_S (default 280 s)
#   3. python -m fastpmd.bench.auto_pick: PREDICTED (cost model) vs MEASURED ms per method, `auto`'s pick by
#      prediction and with FASTPMD_AUTOTUNE=1, the fastest fastpmd backend.   cap AUTO_PICK_S (default 120 s)
# Results: OUT_DIR/gpu_timing.{json,md} (written after each N), OUT_DIR/auto_pick.md, OUT_DIR/kernel_tests.log,
# OUT_DIR/summary.txt.
# Missing peers are skipped rows with the reason; to bring them, on a machine with the package registry:
#   bash bench/gpu_env.sh download peers      # fills .whl/ (git-ignored); carry ".whl" to the device
# Exit status: 0 when every phase ran and no check FAILed; 1 otherwise; 2 without CUDA.
# CPU dry run of the same code path (tiny sizes; triton and Liger FLCE rows skipped with the reason):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TIMING_ARGS="--n 64 --hidden 32 --vocab 301 --dtype float32" \
#       GPU_CHECK_SKIP_TESTS=1 bash bench/gpu_check.sh /tmp/dry
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/fastpmd-gpu-check}}"
mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
unset TRITON_INTERPRET

# 0. set-up
source bench/gpu_env.sh
gpu_check_init "$OUT_DIR" gpu_check "$DEVICE" || exit 2
if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      'cuda', torch.version.cuda)" 2>&1 | tee -a "$summary"
phase_verdict setup 0

# 1. kernel tests, compiled (GPU_CHECK_PYTEST_ARGS: extra pytest arguments, e.g. -k NAME)
# shellcheck disable=SC2086
if [[ -z "${GPU_CHECK_SKIP_TESTS:-}" ]]; then
    files=()
    for f in tests/kernels/test_kernels*.py; do  # an explicit file is collected even with --ignore: leave it out here
        [[ $f == tests/kernels/test_report.py ]] || files+=("$f")
    done
    echo "kernel tests: ${files[*]} ${GPU_CHECK_PYTEST_ARGS:-}" >"$OUT_DIR/kernel_tests.log"
    timeout -k 10 "${KERNEL_TESTS_S:-150}" "$PYTHON" -m pytest -q -p no:cacheprovider "${files[@]}" \
        ${GPU_CHECK_PYTEST_ARGS:-} >>"$OUT_DIR/kernel_tests.log" 2>&1
    rc=$?
    tail -n 5 "$OUT_DIR/kernel_tests.log"
    phase_verdict "kernel tests (log: $OUT_DIR/kernel_tests.log)" $rc
fi

# 2. timing: one interleaved run per N; no new N starts after --budget-s
# shellcheck disable=SC2086  # GPU_CHECK_TIMING_ARGS is a list of arguments
timeout -k 10 "${TIMING_S:-280}" "$PYTHON" -m fastpmd.bench.gpu_timing --device "$DEVICE" --out "$OUT_DIR" \
    --budget-s "${TIMING_BUDGET_S:-160}" ${GPU_CHECK_TIMING_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_timing.log"
rc=$?
phase_verdict "gpu_timing (table: $OUT_DIR/gpu_timing.md)" $rc
if grep -q "^    FAIL" "$OUT_DIR/gpu_timing.md" 2>/dev/null; then
    status=1
fi
grep -E "^    (PASS|FAIL|SKIP)" "$OUT_DIR/gpu_timing.md" 2>/dev/null | tee -a "$summary"

# 3. auto's pick: the cost model's PREDICTED ms beside the measured ones, the backend `auto` predicts, the one
#    it picks with FASTPMD_AUTOTUNE=1 (timed once per N), and the fastest fastpmd backend measured
timeout -k 10 "${AUTO_PICK_S:-120}" env FASTPMD_AUTOTUNE=1 "$PYTHON" -m fastpmd.bench.auto_pick \
    --timing "$OUT_DIR/gpu_timing.json" --device "$DEVICE" 2>&1 | tee "$OUT_DIR/auto_pick.log"
rc=$?
phase_verdict "auto pick (table: $OUT_DIR/auto_pick.md)" $rc
grep -E "^(auto|fastest)" "$OUT_DIR/auto_pick.md" 2>/dev/null | tee -a "$summary"
say "done in $SECONDS s, exit $status"
exit $status
