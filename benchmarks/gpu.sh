#!/usr/bin/env bash
# On the GPU machine (no network), from the repository root:
#   bash benchmarks/gpu.sh --part gpt2      # one part of the GPU benchmark (≤ 8 min; see benchmarks/gpu.py)
#   bash benchmarks/gpu.sh --part llama
#   bash benchmarks/gpu.sh ckpt             # the checkpoint save/load rows on this host's CPUs
# Build the wheels here first with `make gpu-wheels` (benchmarks/wheels, Python 3.12). They go into a
# venv that also sees the image's packages; every requirement of deepspeed, datasets and
# transformers is checked there, and the three are imported, before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SHARDFORGE_GPU_VENV:-/tmp/shardforge-gpu-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
  extra=()
  if [ -d benchmarks/wheels-arrow ]; then extra=(benchmarks/wheels-arrow/*.whl); fi
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile benchmarks/wheels/*.whl "${extra[@]}"
fi
export PYTHONPATH="$PWD"
"$VENV/bin/python" -m benchmarks.wheel_check --installed
"$VENV/bin/python" -c "import deepspeed, datasets, transformers, train.loop.trainer; print('gpu.sh: deepspeed', deepspeed.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__)"
if [ "${1:-}" = "ckpt" ]; then
  exec "$VENV/bin/python" -m benchmarks.cpu --only ckpt --out benchmarks/results/ckpt-gpu-host.json
fi
exec "$VENV/bin/python" -m benchmarks.gpu "$@"
