#!/bin/bash
# Fourth session's device calls (H100): bitsandbytes' wheel carried in .whl/, logs under $OUT.
#   bash benchmarks/device_s4.sh optim     # optimizer rounding variants (logtable) + full optimizer table
#   bash benchmarks/device_s4.sh orient    # LLM.int8 small M: operand order of XLA's int8 dot
. "$(dirname "$0")/_device_env.sh"
for mode in "$@"; do
  case "$mode" in
    optim)
      timeout 220 python3 benchmarks/bench_optim.py --variants --out "$OUT/optim.json" > "$OUT/optim.log" 2>&1
      echo "optim rc=$?"
      grep -E "variant|applied|quantizer|lowbit|optax|bnb|bitsandbytes|copy|FAILED" "$OUT/optim.log" | cut -c1-220 ;;
    optim_launch)
      timeout 200 python3 benchmarks/bench_optim.py --quantizer logtable --sweep-launch --out "$OUT/optim_launch.json" \
        > "$OUT/optim_launch.log" 2>&1
      echo "optim launch rc=$?"
      grep -E "launch|copy|FAILED" "$OUT/optim_launch.log" | cut -c1-220 ;;
    optim_kernel)  # code variants: same-run times, then ncu launch stats (registers) of each
      timeout 200 python3 benchmarks/bench_optim.py --quantizer logtable --sweep-kernel > "$OUT/optim_kernel.log" 2>&1
      echo "optim kernel rc=$?"
      grep -E "^kernel|copy|FAILED" "$OUT/optim_kernel.log" | cut -c1-220
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 "$NCU" --target-processes all -k "regex:adam" --launch-count 14 \
        --section LaunchStats --section Occupancy python3 benchmarks/bench_optim.py --quantizer logtable --ncu-kernel \
        > "$OUT/optim_kernel_ncu.txt" 2>&1
      echo "ncu rc=$?"
      grep -E "^variant|Registers Per Thread|Theoretical Occupancy" "$OUT/optim_kernel_ncu.txt" | cut -c1-150 ;;
    int8_small)  # the LLM.int8 table rows M=1, 16 (bitsandbytes beside), after the orientation choice
      timeout 200 python3 benchmarks/bench_matmul_int8.py --check --ms 1,16 > "$OUT/int8_small.log" 2>&1
      echo "int8 small rc=$?"
      grep -E "'ok': False|ERR" "$OUT/int8_small.log" | cut -c1-300
      sed -n '/^==== per-matmul/,$p' "$OUT/int8_small.log" ;;
    orient)
      INT8_SWEEP=orient OUT=/tmp timeout 150 python3 benchmarks/bench_matmul_int8.py --sweep --ms "" --no-bnb \
        > "$OUT/int8_orient.log" 2>&1
      echo "int8 orient rc=$?"
      grep -E "^sweep|Error|ERR" "$OUT/int8_orient.log" | cut -c1-220 ;;
    ncu_optim)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 "$NCU" --target-processes all -k "regex:adam" --launch-count 1 \
        --set full -f -o /tmp/adam python3 benchmarks/bench_optim.py --ncu --quantizer "${NCU_QUANTIZER:-logtable}" > /tmp/adam_run.txt 2>&1
      echo "ncu rc=$?"
      "$NCU" -i /tmp/adam.ncu-rep --page details > "$OUT/ncu_adam.txt" 2>&1
      "$NCU" -i /tmp/adam.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_adam_sass.csv" 2>&1
      grep -E "Duration|DRAM Throughput|Executed Instructions  |Registers Per|Issue Slots Busy|highest-utilized" "$OUT/ncu_adam.txt" | cut -c1-150 ;;
  esac
done
ls -la "$OUT"
