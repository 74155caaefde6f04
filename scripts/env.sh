# Sourced by scripts/demo.sh, scripts/test.sh and .ci/run: create (or reuse) the project's virtual environment and
# install fastpmd into it, never into the system interpreter.
#   FASTPMD_VENV     where the environment lives (default: .venv in the repository root)
#   FASTPMD_FRESH=1  delete it first (CI: a fresh environment with the newest versions the pyproject allows;
#                    only pip's download cache is reused)
# torch==2.13.0 is installed first and alone: on a CPU machine it is the local CPU build, where an unpinned torch
# would pull a multi-GB CUDA build; every later requirement (torch>=2.4) is then already met.
# Afterwards: `.venv/bin/fastpmd ...`, `.venv/bin/python -m pytest ...`, or `source .venv/bin/activate`.
fastpmd_env() {  # fastpmd_env EXTRAS  (e.g. "" or "test")
    local root venv
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="${FASTPMD_VENV:-$root/.venv}"
    if [ "${FASTPMD_FRESH:-0}" = 1 ]; then rm -rf "$venv"; fi
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" || { echo "error: 'python3 -m venv $venv' failed (Debian: apt-get install python3-venv)" >&2; return 1; }
        "$venv/bin/python" -m pip install -q --upgrade pip
    fi
    "$venv/bin/python" -m pip install -q torch==2.13.0
    "$venv/bin/python" -m pip install -q -e "$root${1:+[$1]}"
    export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
    hash -r
}

fastpmd_versions() {  # the resolved versions that matter, one line (CI's log)
    python - <<'PY'
import importlib.metadata as md
names = ["torch", "triton", "transformers", "kernels", "trl", "peft", "accelerate", "wandb", "liger-kernel",
         "cut-cross-entropy", "pytest", "setuptools", "pip"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
import sys
print("versions: python " + sys.version.split()[0] + ", " + ", ".join(f"{n} {version(n)}" for n in names))
PY
}
