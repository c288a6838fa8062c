#!/usr/bin/env bash
# Creates .venv (if missing) and installs metaoptimizer with the pinned CPU build of torch and the
# evaluation baselines (Prodigy, schedule-free AdamW: the "baselines" extra).
# Usage: scripts/setup.sh [extra]   (extra: "dev" adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extra="${1:-}"
target=".[baselines${extra:+,$extra}]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e "$target"
