# Sourced by the benchmarks/device_*.sh scripts on the device machine: bitsandbytes' wheel
# (carried in .whl/) installed beside the image's packages, unbuffered Python, logs under $OUT,
# and the GPU's clocks and temperature first (they explain run-to-run spread).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader

# The steps the 4-bit device calls repeat (logs $OUT/NAME_*.log, JSON under $OUT/NAME/):
#   engine_check NAME SECS        the one-row GEMV's self-checks and products on this GPU
#   sweep_4bit NAME PLAN SECS     bench_matmul_4bit.py --sweep --plan PLAN at N=14336, no bitsandbytes
#   table_4bit NAME MS SECS       the per-matmul table for rows MS at N=14336, bitsandbytes beside it
engine_check() {
  timeout "$2" python3 benchmarks/check_gemv_engine.py > "$OUT/$1_engine.log" 2>&1
  echo "engine rc=$?"; grep -vE "^\s*$" "$OUT/$1_engine.log" | grep -vE "constant|folding|bug|XLA_FLAGS|gather" | cut -c1-300
}
sweep_4bit() {
  mkdir -p "$OUT/$1"
  OUT="$OUT/$1" timeout "$3" python3 benchmarks/bench_matmul_4bit.py --sweep --plan "$2" --ms "" --ns 14336 --no-bnb \
    > "$OUT/$1_sweep.log" 2>&1
  echo "sweep rc=$?"; grep -E "^sweep" "$OUT/$1_sweep.log" | cut -c1-240
}
table_4bit() {
  mkdir -p "$OUT/$1"
  OUT="$OUT/$1" timeout "$3" python3 benchmarks/bench_matmul_4bit.py --ms "$2" --ns 14336 > "$OUT/$1_table.log" 2>&1
  echo "table rc=$?"; sed -n '/^==== per-matmul/,$p' "$OUT/$1_table.log" | cut -c1-250
}
