#!/bin/bash
# Fifth session's device calls (H100): bitsandbytes' wheel carried in .whl/, logs under $OUT.
#   bash benchmarks/device_s5.sh gemv_check gemv_sweep   # tensor-core GEMV: GPU checks, launch sweep
#   bash benchmarks/device_s5.sh decode                   # batch-1 decode: GEMV engines same run + profile
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
OUT=${OUT:-/tmp}
MMA="--config gemv.engine=mma --config gemv_narrow.engine=mma"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
for mode in "$@"; do
  case "$mode" in
    gemv_check)  # the standard cases with the mma engine as default, then every sweep variant
      OUT=/tmp timeout 240 python3 benchmarks/bench_matmul_4bit.py --check --check-variants --ms "" $MMA \
        > "$OUT/gemv_check.log" 2>&1
      echo "gemv check rc=$?"
      grep -E "all_ok|'ok': False|error|Error" "$OUT/gemv_check.log" | cut -c1-400 ;;
    gemv_sweep)
      OUT=/tmp timeout 300 python3 benchmarks/bench_matmul_4bit.py --sweep --sweep-seconds 200 --ms "" \
        > "$OUT/gemv_sweep.log" 2>&1
      echo "gemv sweep rc=$?"
      grep -E "^sweep|copy" "$OUT/gemv_sweep.log" | cut -c1-300 ;;
    table)  # M=1, 16 rows of the 4-bit table with bitsandbytes beside, mma engine
      OUT=/tmp timeout 300 python3 benchmarks/bench_matmul_4bit.py --ms 1,16 $MMA > "$OUT/table.log" 2>&1
      echo "table rc=$?"
      sed -n '/^==== per-matmul/,$p' "$OUT/table.log" ;;
    decode)
      timeout 400 python3 benchmarks/profile_decode.py --layers 32 --calls 20 --sweep $MMA > "$OUT/decode.log" 2>&1
      echo "decode rc=$?"
      grep -vE "^\s*$" "$OUT/decode.log" | grep -E "sweep|ms|tok|diff|gemv|fusion|total|span" | head -60 | cut -c1-220 ;;
  esac
done
ls -la "$OUT"
