#!/bin/bash
# Fifth session's device calls (H100): bitsandbytes' wheel carried in .whl/, logs under $OUT.
#   bash benchmarks/device_s5.sh gemv_check gemv_sweep   # tensor-core GEMV: GPU checks, launch sweep
#   bash benchmarks/device_s5.sh decode                   # batch-1 decode: GEMV engines same run + profile
. "$(dirname "$0")/_device_env.sh"
for mode in "$@"; do
  case "$mode" in
    gemv_check)  # the standard cases (the mma engine is the default), then every sweep variant
      OUT=/tmp timeout 240 python3 benchmarks/bench_matmul_4bit.py --check --check-variants --ms "" \
        > "$OUT/gemv_check.log" 2>&1
      echo "gemv check rc=$?"
      grep -E "all_ok|'ok': False|error|Error" "$OUT/gemv_check.log" | cut -c1-400 ;;
    gemv_sweep)
      OUT=/tmp timeout 300 python3 benchmarks/bench_matmul_4bit.py --sweep --sweep-seconds 200 --ms "" \
        > "$OUT/gemv_sweep.log" 2>&1
      echo "gemv sweep rc=$?"
      grep -E "^sweep|copy" "$OUT/gemv_sweep.log" | cut -c1-300 ;;
    table)  # M=1, 16 rows of the 4-bit table with bitsandbytes beside
      OUT=/tmp timeout 300 python3 benchmarks/bench_matmul_4bit.py --ms 1,16 > "$OUT/table.log" 2>&1
      echo "table rc=$?"
      sed -n '/^==== per-matmul/,$p' "$OUT/table.log" ;;
    decode)
      timeout 400 python3 benchmarks/profile_decode.py --layers 32 --calls 20 --sweep > "$OUT/decode.log" 2>&1
      echo "decode rc=$?"
      grep -vE "^\s*$" "$OUT/decode.log" | grep -E "sweep|ms|tok|diff|gemv|fusion|total|span" | head -60 | cut -c1-220 ;;
    ncu_gemv)  # Nsight Compute on the M=1 GEMV: mma engine (details + SASS), then the row-sum one
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 "$NCU" --target-processes all -k "regex:gemv_4bit" --launch-count 1 \
        --set full -f -o /tmp/gemv_mma python3 benchmarks/ncu_gemv.py --config gemv.engine=mma ${NCU_GEMV_CFG:-} > /tmp/gemv_run.txt 2>&1
      echo "ncu rc=$?"; tail -3 /tmp/gemv_run.txt
      "$NCU" -i /tmp/gemv_mma.ncu-rep --page details > "$OUT/ncu_gemv_mma.txt" 2>&1
      "$NCU" -i /tmp/gemv_mma.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_gemv_mma_sass.csv" 2>&1
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 "$NCU" --target-processes all -k "regex:gemv_4bit" --launch-count 1 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section InstructionStats \
        python3 benchmarks/ncu_gemv.py > "$OUT/ncu_gemv_rowsum.txt" 2>&1
      for f in "$OUT"/ncu_gemv_mma.txt "$OUT"/ncu_gemv_rowsum.txt; do echo "== $f"
        grep -E "Duration|DRAM Throughput|Executed Instructions  |Registers Per|Issue Slots Busy|Achieved Occupancy|Theoretical Occupancy|Shared Memory Configuration Size|Dynamic Shared|Static Shared" "$f" | cut -c1-150; done ;;
  esac
done
ls -la "$OUT"
