#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels, then run the GPU benchmark.
# Build the wheels here first with `make gpu-wheels` (writes benchmarks/wheels/, Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import deepspeed, datasets" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps benchmarks/wheels/*.whl
fi
python -m benchmarks.gpu "$@"
# the checkpoint save/load ratios on this host's CPUs (sha256 with SHA extensions, more cores)
python -m benchmarks.cpu --only ckpt --out benchmarks/results/ckpt-gpu-host.json
