export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 100 python3 - <<'PY'
import time, jax, jax.numpy as jnp, numpy as np
from lowbit_jax import quant
from lowbit_jax.ops import _matmul_4bit_kernels as kern
from pallas_kernels import gemv_4bit
t0 = time.time()
w = jax.random.normal(jax.random.PRNGKey(0), (256, 1024), jnp.float32)
q = quant.quantize_4bit(w, 64, "nf4", compress_statistics=True)
ops = kern.operands(q); rest = {k: v for k, v in ops.items() if k not in ("packed", "absmax")}
x = jax.random.normal(jax.random.PRNGKey(1), (1, 1024), jnp.bfloat16)
ref = np.asarray(x, np.float32) @ np.asarray(quant.dequantize_4bit(q, jnp.float32)).T
f = jax.jit(lambda x: gemv_4bit.gemv_4bit(x, ops["packed"], ops["absmax"], **rest, engine="mma"))
lo = f.lower(x)
print("lowered", time.time() - t0, flush=True)
c = lo.compile()
print("compiled", time.time() - t0, flush=True)
y = np.asarray(c(x), np.float32)
print("ran", time.time() - t0, np.abs(y - ref).max() / np.abs(ref).max(), flush=True)
PY
echo rc=$?
