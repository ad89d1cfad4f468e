#!/usr/bin/env bash
# One stage of the GPU bring-up per device call (each call has a 10-minute limit), results under
# $OUT (the device tool's output folder; ./gpu_out elsewhere). Run from the repository root:
#   scripts/gpu_session.sh tests    # tests/ops + CUDA graphs on the GPU: kernels vs twins, engine on Triton
#   scripts/gpu_session.sh verify   # dayzero verify (ops + built-in model + V4-Flash slice), verify.json
#   scripts/gpu_session.sh tune     # dayzero tune; the table is kept in $OUT/cache for the bench stage
#   scripts/gpu_session.sh bench    # dayzero bench --size flash, S1-S6 -> $OUT/bench.jsonl + PNG
#   scripts/gpu_session.sh long     # S7 alone (a 1M-token prompt through the engine: minutes)
# The package is used from the checkout (PYTHONPATH), not installed: the device machine has no network.
set -u
stage=${1:?usage: scripts/gpu_session.sh tests|verify|tune|bench|long}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DAYZERO_CACHE_DIR=${DAYZERO_CACHE_DIR:-$OUT/cache}
py=python3
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/device.txt" 2>&1
case "$stage" in
  tests)  $py -m pytest -q -p no:cacheprovider tests/ops tests/engine/test_graphs.py > "$OUT/pytest_ops.log" 2>&1; rc=$?
          tail -n 25 "$OUT/pytest_ops.log" ;;
  verify) $py -m dayzero verify --out "$OUT/verify.json" > "$OUT/verify.log" 2>&1; rc=$?
          tail -n 40 "$OUT/verify.log" ;;
  tune)   $py -m dayzero tune > "$OUT/tune.log" 2>&1; rc=$?
          tail -n 40 "$OUT/tune.log" ;;
  bench)  $py -m dayzero bench --size flash --out-dir "$OUT" --scenario S1 --scenario S2 --scenario S3 \
              --scenario S4 --scenario S5 --scenario S6 > "$OUT/bench.log" 2>&1; rc=$?
          tail -n 30 "$OUT/bench.log" ;;
  long)   timeout 580 $py -m dayzero bench --size flash --out-dir "$OUT" --scenario S7 > "$OUT/long.log" 2>&1; rc=$?
          tail -n 30 "$OUT/long.log" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
cat "$OUT/device.txt"
echo "stage $stage rc=$rc"
exit $rc
