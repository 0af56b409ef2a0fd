#!/bin/bash
# One device call for diagnosis (H100): where the large-M time goes (jax.profiler), launch and
# assembly sweeps of the large-M paths, and ncu counters + per-SASS-line stall samples of the
# GEMV and the 8-bit Adam kernel. Logs and json under $OUT (at most 8 files come back).
#   bash benchmarks/device_diag.sh      (repo root; bitsandbytes wheel carried in .whl/ is not needed)
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 170 python3 benchmarks/bench_matmul_int8.py --profile --profile-ms 4096 --sweep --sweep-seconds 110 \
  --ms "" --no-bnb > "$OUT/int8.log" 2>&1
echo "int8 rc=$?"
BENCH_TAG=_bands timeout 170 python3 benchmarks/bench_matmul_4bit.py --profile --profile-ms 4096 --sweep \
  --plan bands --sweep-seconds 100 --ms "" --ns 14336 --no-bnb > "$OUT/4bit.log" 2>&1
echo "4bit rc=$?"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
ncu_one() {  # name, kernel regex, command...
  local name=$1 rx=$2; shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 "$NCU" --target-processes all -k "regex:$rx" --launch-skip 2 \
    --launch-count 1 --set full --import-source no -f -o "/tmp/$name" "$@" > "/tmp/${name}_run.txt" 2>&1
  echo "ncu $name rc=$?"
  { tail -5 "/tmp/${name}_run.txt"; "$NCU" -i "/tmp/$name.ncu-rep" --page details; } > "$OUT/ncu_$name.txt" 2>&1
  "$NCU" -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${name}_sass.csv" 2>&1 \
    || "$NCU" -i "/tmp/$name.ncu-rep" --page source --csv > "$OUT/ncu_${name}_sass.csv" 2>&1
}
if [ -n "$NCU" ]; then
  ncu_one adam adam python3 benchmarks/bench_optim.py --ncu
  ncu_one gemv gemv_4bit python3 benchmarks/bench_matmul_4bit.py --ncu
fi
grep -E "^sweep|^profile|^ +[0-9.]+ x" "$OUT/int8.log" | cut -c1-220
grep -E "^sweep|^profile|^ +[0-9.]+ x" "$OUT/4bit.log" | cut -c1-220
grep -E "Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Shared Memory Configuration Size|Dynamic Shared|Static Shared|Block Limit|Issue Slots Busy|No Eligible|Warp Cycles Per Issued" "$OUT"/ncu_*.txt | cut -c1-200
ls -la "$OUT"
