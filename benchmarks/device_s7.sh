#!/bin/bash
# Seventh session's device calls (H100): bitsandbytes' wheel carried in .whl/, logs under $OUT.
#   bash benchmarks/device_s7.sh int8_digits   # LLM.int8 small M: one searched outlier digit vs two
#   bash benchmarks/device_s7.sh int8_gemv     # LLM.int8 small M: the one-launch GEMV vs XLA's dot
#   bash benchmarks/device_s7.sh int8_final    # errors on bitsandbytes' inputs, then the small-M table with bnb
#   bash benchmarks/device_s7.sh nibble        # 4-bit one-row GEMV: self-check, nibble-order A/B, M=1,16 table
#   bash benchmarks/device_s7.sh m16           # 4-bit M=16: where a call's time goes, then the dot GEMV's launch sweep
. "$(dirname "$0")/_device_env.sh"
for mode in "$@"; do
  case "$mode" in
    int8_digits)
      mkdir -p "$OUT/sweep" "$OUT/errors" "$OUT/table"
      INT8_SWEEP=digits OUT="$OUT/sweep" timeout 200 python3 benchmarks/bench_matmul_int8.py --sweep --ms "" --no-bnb \
        > "$OUT/int8_digits_sweep.log" 2>&1
      echo "sweep rc=$?"; grep -E "^sweep" "$OUT/int8_digits_sweep.log" | cut -c1-200
      OUT="$OUT/errors" timeout 120 python3 benchmarks/bench_matmul_int8.py --errors-fp16 --ms 1,16 > "$OUT/int8_errors.log" 2>&1
      echo "errors rc=$?"; grep -E "^errors" "$OUT/int8_errors.log" | cut -c1-300
      OUT="$OUT/table" timeout 220 python3 benchmarks/bench_matmul_int8.py --check --profile --profile-ms 16 --ms 1,16 \
        > "$OUT/int8_table.log" 2>&1
      echo "table rc=$?"
      grep -E "check|^\|" "$OUT/int8_table.log" | cut -c1-250 | head -40 ;;
    int8_gemv)
      mkdir -p "$OUT/gemv_check" "$OUT/gemv_sweep" "$OUT/gemv_table"
      CHECK_MAX_M=17 OUT="$OUT/gemv_check" timeout 90 python3 benchmarks/bench_matmul_int8.py --check --ms "" \
        > "$OUT/int8_gemv_check.log" 2>&1
      echo "check rc=$?"; grep -E "^check" "$OUT/int8_gemv_check.log" | grep -E "gemv|ERR|False" | cut -c1-250
      INT8_SWEEP=gemv OUT="$OUT/gemv_sweep" timeout 220 python3 benchmarks/bench_matmul_int8.py --sweep --ms "" --no-bnb \
        > "$OUT/int8_gemv_sweep.log" 2>&1
      echo "sweep rc=$?"; grep -E "^sweep" "$OUT/int8_gemv_sweep.log" | cut -c1-200
      OUT="$OUT/gemv_table" timeout 200 python3 benchmarks/bench_matmul_int8.py --profile --profile-ms 16 --ms 16,8,1 --no-bnb \
        > "$OUT/int8_gemv_table.log" 2>&1
      echo "table rc=$?"; grep -E "^\||us =" "$OUT/int8_gemv_table.log" | cut -c1-250 ;;
    int8_final)
      mkdir -p "$OUT/final_errors" "$OUT/final_table"
      OUT="$OUT/final_errors" timeout 100 python3 benchmarks/bench_matmul_int8.py --errors-fp16 --ms 1,16 \
        > "$OUT/int8_final_errors.log" 2>&1
      echo "errors rc=$?"; grep -E "^errors" "$OUT/int8_final_errors.log" | cut -c1-300
      OUT="$OUT/final_table" timeout 400 python3 benchmarks/bench_matmul_int8.py --ms 16,12,1 \
        > "$OUT/int8_final_table.log" 2>&1
      echo "table rc=$?"; grep -E "^\|" "$OUT/int8_final_table.log" | cut -c1-250 ;;
    nibble)
      engine_check nibble 120; sweep_4bit nibble_sweep decode 150; table_4bit nibble 1,16 240 ;;
    m16)
      mkdir -p "$OUT/m16"
      OUT="$OUT/m16" timeout 120 python3 benchmarks/bench_matmul_4bit.py --profile --profile-ms 16 --ms "" --no-bnb \
        > "$OUT/m16_profile.log" 2>&1
      echo "profile rc=$?"; grep -E "us =" "$OUT/m16_profile.log" | head -12 | cut -c1-200
      OUT="$OUT/m16" BENCH_TAG=_sweep timeout 200 python3 benchmarks/bench_matmul_4bit.py --sweep --plan m16 --ms "" \
        --ns 14336 --no-bnb > "$OUT/m16_sweep.log" 2>&1
      echo "sweep rc=$?"; grep -E "^sweep" "$OUT/m16_sweep.log" | cut -c1-220 ;;
  esac
done
ls -la "$OUT"
