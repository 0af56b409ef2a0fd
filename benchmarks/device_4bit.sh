#!/bin/bash
# One device call that installs, checks and times the 4-bit kernels (H100), logs and json under $OUT:
#   GPU check of every path and sweep variant -> kernel profile (jax.profiler) -> launch sweep
#   -> full table with the best configs, XLA bf16 and bitsandbytes in the same process -> ncu.
# Usage (device machine, repo root, bitsandbytes wheel carried in .whl/):
#   bash benchmarks/device_4bit.sh [sweep_seconds]
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
OUT=${OUT:-/tmp}
S=${1:-90}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
BENCH_TAG=_final timeout 430 python3 benchmarks/bench_matmul_4bit.py --check --check-variants --profile --sweep \
  --apply-best --sweep-seconds "$S" --ms 1,16,128,1024,4096 --ns 14336,4096 > "$OUT/final.log" 2>&1
echo "bench rc=$?"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then  # no preallocation: ncu saves and restores device memory on every replay
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 70 "$NCU" --target-processes all -k regex:'gemv_4bit|forward_body' \
    --launch-count 2 --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats python3 benchmarks/bench_matmul_4bit.py --ncu > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"
fi
grep -E "check all_ok|'ok': False|^applied|^sweep best" "$OUT/final.log" | cut -c1-400
sed -n '/^==== per-matmul/,$p' "$OUT/final.log"
grep -E "^  [A-Za-z_].*\(|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|No Eligible" "$OUT/ncu.txt" 2>/dev/null | head -30
