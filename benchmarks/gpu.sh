#!/usr/bin/env bash
# The GPU proof in one command, for one 15-minute device slot (one H100 or H200, Python 3.12, the
# image's torch 2.11, no network), from the repository root:
#
#   bash benchmarks/gpu.sh               # install offline, phase 1 (checks, <= 3 min), phase 2 (measurements)
#   bash benchmarks/gpu.sh --check-only  # phase 1 alone
#   bash benchmarks/gpu.sh --only ckpt,resume   # install + phase 1 + those measurements (a rerun)
#   bash benchmarks/gpu.sh --skip-check --only gpt2-ddp-compile   # a rerun right after a passing phase 1
#   bash benchmarks/gpu.sh --cpu-smoke   # the same orchestration on this CPU machine, tiny models
#
# The device call (built and checked here first: `make gpu-wheels`, `make data`; the carry list is
# benchmarks.gpu_packaging.CARRY and tests/test_gpu_packaging.py keeps it under 60 MiB):
#
#   run(command="bash benchmarks/gpu.sh", carry=["benchmarks/wheels", "data/shakespeare"], timeout_s=540)
#
# Everything ends within 8 minutes of the start (DEADLINE_S in benchmarks/gpu.py); timeout_s=540
# is a minute of margin. The rest of the 15-minute slot (the start takes 1-2 minutes) leaves room
# for one rerun on the still-warm machine (given back 30 s after a call), e.g.
# `bash benchmarks/gpu.sh --only ckpt,resume`. Results land in $OUT (here: benchmarks/out/):
#   gpu-check.json     phase 1, rewritten after every check (the first failure stops everything)
#   gpu-results.jsonl  phase 2, one line per measurement as it finishes
#   gpu-results.json   phase 2, rewritten whole after every measurement (with the ratios)
#   gpu.log            this script's whole output
#   gpu-check.log, gpu-measure.log   the output of phase 1's runs and of every measurement
# Exit: 0 all passed, 1 a measurement failed or timed out, 2 bad arguments, 3 phase 1 failed,
# 4 the offline install failed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
MODE=gpu CHECK_ONLY=0 SKIP_CHECK=0 ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=smoke ;;
    --check-only) CHECK_ONLY=1 ;;
    --skip-check) SKIP_CHECK=1 ;;
    --only) ONLY=(--only "$2"); shift ;;
    *) echo "gpu.sh: unknown argument $1 (see the header of benchmarks/gpu.sh)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$PWD/benchmarks/out}
WORK=${SHARDFORGE_GPU_WORK:-/tmp/shardforge-gpu-work}
PY=${SHARDFORGE_GPU_PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
rm -rf "$OUT"/gpu-check.json "$OUT"/gpu-results.json "$OUT"/gpu-results.jsonl "$OUT"/gpu*.log "$WORK/runs"
exec > >(tee -a "$OUT/gpu.log") 2>&1  # the whole log comes back with $OUT, however the call ends
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SMOKE=()
WHEELS=()
if [ "$MODE" = smoke ]; then
  SMOKE=(--cpu-smoke)
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  # The carried wheels go to a folder first on PYTHONPATH: they shadow the image's older
  # transformers/tokenizers; everything else comes from the image's own environment (a venv made
  # from the image's python3, itself a venv, would not see the image's packages).
  SITE=${SHARDFORGE_GPU_SITE:-/tmp/shardforge-site}
  if ! ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu.sh: benchmarks/wheels is empty here: run \`make gpu-wheels\` and name benchmarks/wheels in carry" >&2
    exit 4
  fi
  WANT=$(cd benchmarks/wheels && ls *.whl | sort | tr '\n' ' ')
  if [ "$(cat "$SITE/.shardforge-wheels" 2>/dev/null)" = "$WANT" ]; then
    echo "gpu.sh: the carried wheels are installed in $SITE already (a rerun on a warm machine)"
  else
    echo "gpu.sh: installing $(ls benchmarks/wheels/*.whl | wc -l) carried wheels into $SITE (offline)"
    rm -rf "$SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" benchmarks/wheels/*.whl; then
      echo "gpu.sh: the offline install of benchmarks/wheels failed" >&2
      exit 4
    fi
    echo "$WANT" > "$SITE/.shardforge-wheels"
  fi
  export PYTHONPATH="$SITE:$PWD"
  WHEELS=(--wheels benchmarks/wheels)
  echo "gpu.sh: installed in $(( $(date +%s) - START )) s"
fi
code=0
[ $SKIP_CHECK = 1 ] || { "$PY" -m benchmarks.gpu_check --out "$OUT" --work "$WORK" "${WHEELS[@]}" "${SMOKE[@]}"; code=$?; }
if [ $code -ne 0 ]; then
  echo "gpu.sh: phase 1 failed (exit $code): see $OUT/gpu-check.json; nothing was measured" >&2
  exit 3
fi
[ $CHECK_ONLY = 1 ] && exit 0
DEADLINE=(--deadline-at $((START + 480)))  # benchmarks.gpu.DEADLINE_S: the whole script, install included
[ "$MODE" = smoke ] && DEADLINE=()
"$PY" -m benchmarks.gpu --out "$OUT" --work "$WORK" "${DEADLINE[@]}" "${ONLY[@]}" "${SMOKE[@]}"
code=$?
echo "gpu.sh: done in $(( $(date +%s) - START )) s (exit $code); results in $OUT"
exit $code
