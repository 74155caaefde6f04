#!/usr/bin/env bash
# Install into the project's virtual environment (.venv; see scripts/env.sh) and run the test suite from the
# repository root. Extra arguments go to pytest: bash scripts/test.sh tests/core -k fused
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
fastpmd_env test
fastpmd_versions
python -m pytest -q "$@"  # no path given: pyproject's testpaths (tests/)
