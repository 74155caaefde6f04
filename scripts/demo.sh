#!/usr/bin/env bash
# Install into the project's virtual environment (.venv; see scripts/env.sh) and run the main job: the CPU demo
# of the fused PMD loss against the naive path. Extra arguments go to `fastpmd demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
fastpmd_env ""
fastpmd demo "$@"
