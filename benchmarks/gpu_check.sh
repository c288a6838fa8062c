#!/usr/bin/env bash
# GPU measurement for issue 17 (about 3-4 minutes): bash benchmarks/gpu_check.sh
# Uses the first Python that imports a CUDA build of torch and this checkout's dependencies
# (.venv/bin/python, then python3, then python), with this checkout's src/ first on the path;
# installs nothing. Without one it uses the repo's venv (created by scripts/setup.sh if missing,
# which needs the package index) and says that the figures are CPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
probe='import torch, numpy, sklearn, metaoptimizer.optim, sys; sys.exit(0 if torch.cuda.is_available() else 3)'
python=""
for candidate in .venv/bin/python python3 python; do
  command -v "$candidate" >/dev/null 2>&1 || continue
  if "$candidate" -c "$probe" 2>/dev/null; then python="$candidate"; break; fi
done
if [ -z "$python" ]; then
  echo "no Python here imports a CUDA build of torch with this checkout's dependencies; falling back to the CPU"
  [ -x .venv/bin/python ] || scripts/setup.sh
  python=.venv/bin/python
fi
echo "python: $python ($("$python" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 300 "$python" benchmarks/gpu_check.py
