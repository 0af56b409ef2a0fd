#!/bin/bash
# Sixth session's device calls (H100): bitsandbytes' wheel carried in .whl/, logs under $OUT.
#   bash benchmarks/device_s6.sh engine          # which one-row GEMV engine runs (self-check verdicts)
#   bash benchmarks/device_s6.sh optim_layouts   # 8-bit AdamW step: 268M params as 16 / 1 / 64 leaves
#   bash benchmarks/device_s6.sh optim_leaves    # several leaves a launch: variants, ncu against one leaf
#   bash benchmarks/device_s6.sh int8_flags      # LLM.int8 M=16 under XLA's GEMM backends
. "$(dirname "$0")/_device_env.sh"
for mode in "$@"; do
  case "$mode" in
    engine)
      timeout 200 python3 benchmarks/check_gemv_engine.py > "$OUT/engine.log" 2>&1
      echo "engine rc=$?"; grep -vE "^\s*$" "$OUT/engine.log" | grep -vE "constant|folding|bug|XLA_FLAGS|gather" | cut -c1-300 ;;
    table)  # M=1, 16 rows of the 4-bit table with bitsandbytes beside
      OUT=/tmp timeout 300 python3 benchmarks/bench_matmul_4bit.py --ms 1,16 > "$OUT/table.log" 2>&1
      echo "table rc=$?"
      sed -n '/^==== per-matmul/,$p' "$OUT/table.log" ;;
    optim_layouts)
      timeout 300 python3 benchmarks/bench_optim.py --layouts ${OPTIM_LAYOUTS:-16x4096,1x16384,64x2048,16x4096} ${OPTIM_LAYOUT_ARGS:-} \
        --out "$OUT/optim_layouts.json" > "$OUT/optim_layouts.log" 2>&1
      echo "optim layouts rc=$?"; grep -E "layout|device|FAILED" "$OUT/optim_layouts.log" | cut -c1-300 ;;
    optim_leaves)  # the several-leaf launch: leaf selection and rows, then ncu of 16 leaves vs one
      timeout 300 python3 benchmarks/bench_optim.py --sweep-leaves --out "$OUT/optim_leaves.json" > "$OUT/optim_leaves.log" 2>&1
      echo "optim leaves rc=$?"; grep -E "leaves|FAILED" "$OUT/optim_leaves.log" | cut -c1-300
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      for layout in "16 4096" "1 16384"; do set -- $layout
        XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 "$NCU" --target-processes all -k "regex:adam" --launch-count 1 \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section InstructionStats --section WarpStateStats \
          python3 benchmarks/bench_optim.py --ncu --leaves $1 --dim $2 > "$OUT/ncu_optim_$1x$2.txt" 2>&1
        echo "== ncu $1x$2 rc=$?"
        grep -E "Duration|DRAM Throughput|Executed Instructions  |Registers Per|Issue Slots Busy|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Grid Size|Block Size" "$OUT/ncu_optim_$1x$2.txt" | cut -c1-150
      done ;;
    optim)
      timeout 400 python3 benchmarks/bench_optim.py ${OPTIM_ARGS:-} --out "$OUT/optim.json" > "$OUT/optim.log" 2>&1
      echo "optim rc=$?"; grep -vE "^\s*$" "$OUT/optim.log" | grep -vE "Warning|warn" | cut -c1-300 ;;
    int8_flags)  # the same M=16 rows under XLA's default GEMM choice and without its Triton GEMMs
      for flags in "" "--xla_gpu_enable_triton_gemm=false"; do
        echo "== XLA_FLAGS='$flags'"
        XLA_FLAGS="$flags" OUT=/tmp timeout 150 python3 benchmarks/bench_matmul_int8.py --ms 16 --no-bnb \
          > "$OUT/int8_flags_${flags//[^a-z]/_}.log" 2>&1
        echo "rc=$?"; grep -E "^\| *16|M=16|us" "$OUT/int8_flags_${flags//[^a-z]/_}.log" | head -12 | cut -c1-250
      done ;;
  esac
done
ls -la "$OUT"
