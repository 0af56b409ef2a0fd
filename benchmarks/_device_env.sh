# Sourced by the benchmarks/device_*.sh scripts on the device machine: bitsandbytes' wheel
# (carried in .whl/) installed beside the image's packages, unbuffered Python, logs under $OUT,
# and the GPU's clocks and temperature first (they explain run-to-run spread).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
