#!/usr/bin/env bash
# Fresh machine -> the shipped LSTM optimizer's recipe meta-trained for 200 meta-steps (seeded), compared
# before and after meta-training beside tuned Adam; report in demo-output/. Extra options go to `metaopt demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/metaopt demo --out demo-output "$@"
