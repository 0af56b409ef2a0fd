#!/bin/bash
# Final tables (H100), in two device calls so each stays under the 10-minute limit:
#   bash benchmarks/device_final.sh a   # optimizer variants + table, LLM.int8 check + table (+ tile crossover)
#   bash benchmarks/device_final.sh b   # 4-bit check + table, ncu source view of the GEMV
# bitsandbytes' wheel carried in .whl/; logs and json under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
if [ "$1" = a ]; then
  timeout 190 python3 benchmarks/bench_optim.py --variants --out "$OUT/optim.json" > "$OUT/optim.log" 2>&1
  echo "optim rc=$?"
  INT8_SWEEP=crossover OUT=/tmp timeout 70 python3 benchmarks/bench_matmul_int8.py --sweep --sweep-seconds 45 --ms "" \
    --no-bnb > "$OUT/int8_crossover.log" 2>&1
  echo "int8 crossover rc=$?"
  timeout 290 python3 benchmarks/bench_matmul_int8.py --check --ms 1,16,128,1024,4096 > "$OUT/int8.log" 2>&1
  echo "int8 rc=$?"
  grep -E "variant|applied|quantizer|lowbit|optax|bnb|bitsandbytes|copy|FAILED" "$OUT/optim.log" | cut -c1-200
  grep -E "^sweep" "$OUT/int8_crossover.log" | cut -c1-200
  grep -E "'ok': False|ERR" "$OUT/int8.log" | cut -c1-300
  sed -n '/^==== per-matmul/,$p' "$OUT/int8.log"
else
  BENCH_TAG=_final timeout 400 python3 benchmarks/bench_matmul_4bit.py --check --ms 1,16,128,1024,4096 \
    --ns 14336,4096 > "$OUT/4bit.log" 2>&1
  echo "4bit rc=$?"
  timeout 60 python3 benchmarks/bench_matmul_int8.py --errors-fp16 --ms 1,16,128,1024,4096 > "$OUT/int8_errors.log" 2>&1
  echo "int8 errors rc=$?"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 "$NCU" --target-processes all -k "regex:gemv|rowsum" \
    --launch-count 1 --set full --import-source no -f -o /tmp/gemv python3 benchmarks/bench_matmul_4bit.py --ncu \
    > /tmp/gemv_run.txt 2>&1
  echo "ncu rc=$?"
  { grep -E "==PROF==|==ERROR==" /tmp/gemv_run.txt | head; "$NCU" -i /tmp/gemv.ncu-rep --page details; } > "$OUT/ncu_gemv.txt" 2>&1
  "$NCU" -i /tmp/gemv.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_gemv_sass.csv" 2>&1
  grep -E "^errors" "$OUT/int8_errors.log"
  grep -E "check all_ok|'ok': False" "$OUT/4bit.log" | cut -c1-300
  sed -n '/^==== per-matmul/,$p' "$OUT/4bit.log"
  grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|No Eligible" "$OUT/ncu_gemv.txt" | cut -c1-150
fi
ls -la "$OUT"
