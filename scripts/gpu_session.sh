#!/usr/bin/env bash
# One stage of the GPU bring-up per device call (each call has a 10-minute limit), results under
# $OUT (the device tool's output folder; ./gpu_out elsewhere). Run from the repository root:
#   scripts/gpu_session.sh tests    # tests/ops + CUDA graphs on the GPU: kernels vs twins, engine on Triton
#   scripts/gpu_session.sh verify   # dayzero verify (ops + built-in model + V4-Flash slice), verify.json
#   scripts/gpu_session.sh tune     # dayzero tune; the table is kept in $OUT/cache for the bench stage
#   scripts/gpu_session.sh bench    # dayzero bench --size flash, S1-S6 -> $OUT/bench.jsonl + PNG
#   scripts/gpu_session.sh long     # S7 alone (a 1M-token prompt through the engine: minutes)
#   scripts/gpu_session.sh all      # one call for a short lease (15 minutes, start included): verify, S4,
#                                   # S1-S3 + S5, the kernel tests, the engine as one torchrun rank on NCCL,
#                                   # then routed experts on the host (scripts/cpu_experts_check.py), each
#                                   # part capped (under 9.5 minutes in all), written as it goes;
#                                   # six files back (the device tool returns 8)
# The package is used from the checkout (PYTHONPATH), not installed: the device machine has no network.
set -u
stage=${1:?usage: scripts/gpu_session.sh tests|verify|tune|bench|long|all}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
cache=$OUT/cache
[ "$stage" = all ] && cache=/tmp/dayzero-cache  # keeps $OUT to a few files (the device tool returns 8)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DAYZERO_CACHE_DIR=${DAYZERO_CACHE_DIR:-$cache} PYTHONUNBUFFERED=1
py=${PY:-python3}  # PY: another interpreter (a dry run of the plumbing)
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
  all)    rc=0; log=$OUT/all.log
          part() {  # part SECONDS NAME COMMAND...: capped, its output appended to all.log
            local cap=$1 name=$2; shift 2
            echo "=== $name (at most ${cap}s)" >> "$log"; local t0=$SECONDS
            timeout "$cap" "$@" >> "$log" 2>&1; local r=$?
            echo "=== $name rc=$r in $((SECONDS - t0))s$([ $r = 124 ] && echo ' (cut at its cap)')" >> "$log"
            [ $r = 0 ] || rc=1; }
          part 180 verify $py -m dayzero verify --out "$OUT/verify.json"
          part 160 "bench S4" $py -m dayzero bench --size flash --out-dir "$OUT" --scenario S4
          part 100 "bench S1 S2 S3 S5" $py -m dayzero bench --size flash --out-dir "$OUT" --no-baseline \
              --scenario S1 --scenario S2 --scenario S3 --scenario S5
          xdist=""; $py -c "import xdist" >/dev/null 2>&1 && xdist="-n 8"  # kernel compiles in parallel
          part 60 tests $py -m pytest -q -p no:cacheprovider $xdist tests/engine/test_graphs.py tests/ops
          part 45 "one rank on NCCL" $py -m torch.distributed.run --nproc-per-node 1 -m dayzero generate \
              --token-ids 0,17,42 --max-tokens 16 --tensor-parallel-size 1
          part 30 "cpu experts" $py scripts/cpu_experts_check.py --device cuda --max-tokens 32
          grep -E "^=== |PASS|FAIL|roofline|baseline|greedy_tokens_equal" "$log" | tail -n 60 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
cat "$OUT/device.txt"
echo "stage $stage rc=$rc"
exit $rc
