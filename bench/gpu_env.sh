#!/usr/bin/env bash
# Python set-up of a bare GPU machine with no package registry (torch + triton only), shared by
# bench/gpu_check.sh and scripts/gpu_check_train.sh.
#
# Here, on a machine with the package registry, fill .whl/ with what the device lacks (the device runs
# Python 3.12 on x86_64; the versions are the ones the CPU tests use):
#   bash bench/gpu_env.sh download peers   # liger-kernel, cut-cross-entropy; pytest (the kernel tests) (~3 MB)
#   bash bench/gpu_env.sh download train   # transformers and its dependencies (~44 MB; none needs torch)
# which runs
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl pytest==9.0.3
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl transformers==5.24.0
# .whl/ is git-ignored: bring it with the device tool's carry [".whl"]. On the device, `source bench/gpu_env.sh`
# then `gpu_env_setup`: every wheel whose distribution is not installed yet goes to /tmp/fastpmd-site with
#   pip install --no-index --no-deps --target /tmp/fastpmd-site WHEEL
# (never replacing the device's torch, triton or numpy), and PYTHONPATH gains /tmp/fastpmd-site. When fastpmd
# itself is not importable, /tmp/fastpmd-shim/fastpmd links to the checkout's fastpmd/ (whose kernels, train and
# bench packages add the checkout's kernels/, train/, bench/ folders to their __path__: fastpmd/_layout.py), without
# pip or setuptools; PYTHONSAFEPATH=1 keeps the current directory off sys.path, so the run is the same from anywhere.
GPU_ENV_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"  # the interpreter every phase uses
PEER_WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)  # no dependencies beyond torch and triton
TEST_WHEELS=(pytest==9.0.3)
TRAIN_WHEELS=(transformers==5.24.0)

gpu_env_download() {  # $1 = peers | train | all
    local what="${1:-all}" dest="$GPU_ENV_ROOT/.whl" plat=(--python-version 3.12 --platform manylinux_2_28_x86_64)
    mkdir -p "$dest"
    if [[ $what == peers || $what == all ]]; then
        "$PYTHON" -m pip download --no-deps --only-binary=:all: "${plat[@]}" -d "$dest" "${PEER_WHEELS[@]}" || return 1
        "$PYTHON" -m pip download --only-binary=:all: "${plat[@]}" -d "$dest" "${TEST_WHEELS[@]}" || return 1
    fi
    if [[ $what == train || $what == all ]]; then
        "$PYTHON" -m pip download --only-binary=:all: "${plat[@]}" --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$dest" "${TRAIN_WHEELS[@]}" || return 1
    fi
}

_installed() {  # $1 = distribution name
    "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$1" >/dev/null 2>&1
}

gpu_env_setup() {
    local site="${GPU_ENV_TMP:-/tmp}/fastpmd-site" wheel name
    mkdir -p "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    if compgen -G "$GPU_ENV_ROOT/.whl/*.whl" >/dev/null; then
        for wheel in "$GPU_ENV_ROOT"/.whl/*.whl; do
            name="$(basename "$wheel")"; name="${name%%-*}"
            _installed "$name" && continue
            echo "gpu_env: installing $(basename "$wheel") into $site"
            "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" "$wheel" || echo "gpu_env: FAILED $wheel"
        done
    fi
    if [[ -n "${FASTPMD_SHIM:-}" ]] || ! "$PYTHON" -c "import fastpmd.kernels, fastpmd.bench" >/dev/null 2>&1; then
        local shim="${GPU_ENV_TMP:-/tmp}/fastpmd-shim"
        rm -rf "$shim" && mkdir -p "$shim"
        ln -s "$GPU_ENV_ROOT/fastpmd" "$shim/fastpmd"  # fastpmd/<name>/__init__.py adds the checkout's <name>/
        export PYTHONPATH="$shim:$PYTHONPATH"
        export PYTHONSAFEPATH=1  # Python >= 3.11: the repository root's own fastpmd/ (run from there) must not
        #                          shadow the shim, as it would through sys.path[0] = the current directory
        echo "gpu_env: fastpmd imported from the source tree through $shim"
    fi
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
import importlib.util
for dist, mod in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy"),
                  ("pytest", "pytest"), ("transformers", "transformers")):
    if importlib.util.find_spec(mod) is None:
        print(f"gpu_env: {dist} missing (bring wheels: bash bench/gpu_env.sh download peers|train, carry .whl)")
    else:
        print(f"gpu_env: {dist} {md.version(dist)}")
EOF
}

# Phase bookkeeping of the check scripts: gpu_check_init OUT_DIR NAME DEVICE (set-up phase, summary.txt),
# say MESSAGE, phase_verdict PHASE RC (PASS when RC is 0; sets status=1 otherwise).
gpu_check_init() {
    GPU_CHECK_NAME="$2" summary="$1/summary.txt" status=0 phase_start=$SECONDS
    : >"$summary"
    gpu_env_setup >"$1/setup.log" 2>&1  # not in a pipe: it exports PYTHONPATH to this shell
    tee -a "$summary" <"$1/setup.log"
    if [[ $3 == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        say "no CUDA device visible"
        return 2
    fi
}

say() { echo "$GPU_CHECK_NAME: $*" | tee -a "$summary"; }

phase_verdict() {
    local v=PASS
    if [[ $2 -ne 0 ]]; then v=FAIL; status=1; fi
    if [[ $2 -eq 124 || $2 -eq 137 ]]; then v="FAIL (time cap)"; fi
    say "$v  $1 ($((SECONDS - phase_start)) s; total $SECONDS s)"
    phase_start=$SECONDS
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -u
    case "${1:-}" in
        download) gpu_env_download "${2:-all}" ;;
        setup) gpu_env_setup ;;
        *) echo "usage: bash bench/gpu_env.sh download [peers|train|all]  (on the device: source it, gpu_env_setup)" >&2
           exit 2 ;;
    esac
fi
