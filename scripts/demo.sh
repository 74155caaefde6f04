#!/usr/bin/env bash
# Install and run the main job: the CPU demo of the fused PMD loss against the naive path.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
fastpmd demo "$@"
