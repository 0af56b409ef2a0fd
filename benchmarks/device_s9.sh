#!/bin/bash
# Ninth session's device calls (H100): the Mosaic GPU wgmma 4-bit GEMM. bitsandbytes' wheel in .whl/.
#   bash benchmarks/device_s9.sh probe   # wgmma kernel vs the Triton path vs XLA bf16 (CUPTI), M=16..4096
#   bash benchmarks/device_s9.sh check   # every path vs the jnp reference on the GPU (wgmma dispatch on)
#   bash benchmarks/device_s9.sh table   # the M=1,16,128,4096 table with bitsandbytes beside it
#   bash benchmarks/device_s9.sh triton  # M=16,128 with the wgmma dispatch off (BENCH_NO_WGMMA=1)
#   bash benchmarks/device_s9.sh narrow  # N=4096 (few row tiles): wgmma on and off
#   bash benchmarks/device_s9.sh profile # the GPU kernels of one 8-layer call at M=16 and 128
. "$(dirname "$0")/_device_env.sh"
for mode in "$@"; do
  case "$mode" in
    probe)
      for m in ${PROBE_MS:-16 128 256 512 1024 4096}; do
        timeout 150 python3 benchmarks/probe_wgmma_4bit.py --ms $m >> "$OUT/probe.log" 2>&1; echo "probe M=$m rc=$?"
      done
      grep -E "^M=" "$OUT/probe.log" | cut -c1-260 ;;
    check)
      mkdir -p "$OUT/check"
      OUT="$OUT/check" timeout 300 python3 benchmarks/bench_matmul_4bit.py --check --ms "" > "$OUT/check.log" 2>&1
      echo "check rc=$?"; grep -E "^check" "$OUT/check.log" | cut -c1-200 ;;
    table)
      table_4bit table 1,16,128,4096 330 ;;
    triton)  # the same rows with the wgmma dispatch off (the Triton paths), no bitsandbytes
      mkdir -p "$OUT/triton"
      BENCH_NO_WGMMA=1 OUT="$OUT/triton" timeout 200 python3 benchmarks/bench_matmul_4bit.py --ms 16,128 --ns 14336 --no-bnb \
        > "$OUT/triton_table.log" 2>&1
      echo "triton rc=$?"; sed -n '/^==== per-matmul/,$p' "$OUT/triton_table.log" | cut -c1-250 ;;
    narrow)  # N=4096: few 128-row tiles; wgmma dispatch on, then off (the Triton paths), no bitsandbytes
      mkdir -p "$OUT/narrow" "$OUT/narrow_triton"
      OUT="$OUT/narrow" timeout 150 python3 benchmarks/bench_matmul_4bit.py --ms 16,128,512 --ns 4096 --no-bnb \
        > "$OUT/narrow_table.log" 2>&1; echo "narrow rc=$?"
      BENCH_NO_WGMMA=1 OUT="$OUT/narrow_triton" timeout 150 python3 benchmarks/bench_matmul_4bit.py --ms 16,128,512 --ns 4096 \
        --no-bnb > "$OUT/narrow_triton_table.log" 2>&1; echo "narrow triton rc=$?"
      for f in narrow_table narrow_triton_table; do sed -n '/^==== per-matmul/,$p' "$OUT/$f.log" | cut -c1-250; done ;;
    profile)
      mkdir -p "$OUT/profile"
      OUT="$OUT/profile" timeout 150 python3 benchmarks/bench_matmul_4bit.py --profile --profile-ms 16,128 --ms "" \
        > "$OUT/profile.log" 2>&1
      echo "profile rc=$?"; grep -vE "^\s*$" "$OUT/profile.log" | grep -E "M16|M128|us" | head -40 | cut -c1-200 ;;
  esac
done
