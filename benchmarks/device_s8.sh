#!/bin/bash
# Eighth session's device calls (H100): bitsandbytes' wheel carried in .whl/, logs under $OUT.
#   bash benchmarks/device_s8.sh lut      # 4-bit one-row GEMV: the shared-memory byte table decode vs prmt
#                                         # (self-check on the GPU, interleaved A/B, launch shapes), M=1,16 table
#   bash benchmarks/device_s8.sh lut_sweep # the A/B and launch shapes alone
#   bash benchmarks/device_s8.sh lut_dot  # M=16 / M=128: the byte-table decode in the dot kernels vs prmt
#   bash benchmarks/device_s8.sh final    # the GEMM's decode A/B (M=64, 128), then the M=1,16,128,4096 table with bnb
#   bash benchmarks/device_s8.sh gemm128  # M=128: the table GEMM's tile shapes against the bands
#   bash benchmarks/device_s8.sh copies   # the table's copies (32/16/8): GPU self-check of each, then the sweep
#   bash benchmarks/device_s8.sh check    # every path vs the jnp reference on the GPU (the GEMM's table decode)
#   bash benchmarks/device_s8.sh ncu_lut  # Nsight Compute on the table-decode GEMV (NCU_GEMV_CFG: --config overrides)
#   bash benchmarks/device_s8.sh decode   # batch-1 decode, Llama-3-8B shape, 32 layers
. "$(dirname "$0")/_device_env.sh"
for mode in "$@"; do
  case "$mode" in
    lut)
      engine_check lut 150; sweep_4bit lut decode 200; table_4bit lut 1,16 200 ;;
    lut_sweep)
      sweep_4bit lut decode 200 ;;
    lut_dot)
      sweep_4bit lut_dot lut_dot 300 ;;
    final)
      sweep_4bit gemm_ab lut_gemm 150; table_4bit final 1,16,128,4096 400 ;;
    gemm128)  # M=128: the byte-table GEMM's tile shapes against the bands
      sweep_4bit gemm128 gemm128 200 ;;
    copies)  # the table's copies (GPU self-check of each first, then the sweep)
      for c in 32 16 8; do LUT_COPIES=$c timeout 100 python3 -c "
import os, jax.numpy as jnp
from pallas_kernels import _4bit_common as c4
c4.LUT_COPIES = int(os.environ['LUT_COPIES'])
from lowbit_jax.ops import _matmul_4bit_kernels as kern
cfg = dict(kern.GPU_CONFIG['gemv'])
print('copies', c4.LUT_COPIES, 'self-check', kern._run_mma_check(jnp.bfloat16, cfg))" 2>&1 | grep copies; done
      sweep_4bit copies lut_copies 200 ;;
    check)  # kernels vs the jnp reference on the GPU (forward and grad), default dispatch; the GEMV self-checks
      mkdir -p "$OUT/check"
      engine_check check 150
      OUT="$OUT/check" timeout 300 python3 benchmarks/bench_matmul_4bit.py --check --ms "" > "$OUT/check.log" 2>&1
      echo "check rc=$?"; grep -E "^check" "$OUT/check.log" | cut -c1-200 ;;
    ncu_lut)  # Nsight Compute on the M=1 GEMV with the table decode (details + SASS; the first 2 launches are the self-check)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 "$NCU" --target-processes all -k "regex:gemv_4bit" --launch-skip 2 --launch-count 1 \
        --set full -f -o /tmp/gemv_lut python3 benchmarks/ncu_gemv.py ${NCU_GEMV_CFG:-} > /tmp/gemv_run.txt 2>&1
      echo "ncu rc=$?"; tail -3 /tmp/gemv_run.txt
      "$NCU" -i /tmp/gemv_lut.ncu-rep --page details > "$OUT/ncu_gemv_lut.txt" 2>&1
      "$NCU" -i /tmp/gemv_lut.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_gemv_lut_sass.csv" 2>&1
      grep -E "Duration|DRAM Throughput|Executed Instructions  |Registers Per|Issue Slots Busy|Achieved Occupancy|Theoretical Occupancy|Shared Memory Configuration Size|Dynamic Shared|Static Shared|Bank|Block Limit|Warp Cycles Per Issued" "$OUT/ncu_gemv_lut.txt" | cut -c1-150 ;;
    decode)
      timeout 400 python3 benchmarks/profile_decode.py --layers 32 --calls 20 --sweep > "$OUT/decode.log" 2>&1
      echo "decode rc=$?"
      grep -vE "^\s*$" "$OUT/decode.log" | grep -E "sweep|ms|tok|diff|gemv|total|span" | head -50 | cut -c1-220 ;;
  esac
done
ls -la "$OUT"
