#!/usr/bin/env bash
# Install (CPU torch from the local wheel, never the multi-GB CUDA build) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest -q tests "$@"
