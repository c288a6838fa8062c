#!/usr/bin/env bash
# Fresh machine -> the test suite with line coverage of the package.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/python -m pytest -n 2 --cov=metaoptimizer --cov-report=term --cov-report=xml "$@"
