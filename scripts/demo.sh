#!/usr/bin/env bash
# Fresh machine -> meta-trained LSTM optimizer compared against tuned Adam, report in demo-output/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/metaopt demo --out demo-output "$@"
