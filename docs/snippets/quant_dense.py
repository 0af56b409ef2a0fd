"""QuantDense: nn.Dense with an NF4 (or FP4 / LLM.int8) weight, stored as bitsandbytes stores it."""
import jax, jax.numpy as jnp
from lowbit_jax import quant
from lowbit_jax.nn import QuantConfig, memory_footprint
from lowbit_jax.nn.linen import QuantDense

layer = QuantDense(features=1024, quant=QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True))
x = jax.random.normal(jax.random.key(0), (8, 4096), jnp.bfloat16)
variables = layer.init(jax.random.key(1), x)
y = jax.jit(layer.apply)(variables, x)  # bf16 matmul against the 4-bit weight (fused Pallas kernel on GPU)

kernel = variables["params"]["kernel"]  # a Packed4bit pytree: uint8 codes + absmax, [out, in]
w = quant.dequantize(kernel, jnp.float32).T  # the weight it stands for, [in, out]
err = jnp.linalg.norm(y.astype(jnp.float32) - x.astype(jnp.float32) @ w) / jnp.linalg.norm(x.astype(jnp.float32) @ w)
print(type(kernel).__name__, kernel.shape, kernel.quant_type, "double quant:", kernel.double_quant)
print(f"output {y.shape} {y.dtype}, relative error vs the dequantized weight {float(err):.1e} (bf16 rounding)")
print(memory_footprint(variables))  # 4096x1024 weight: ~2.1 MB in NF4+DQ instead of 8.4 MB in fp32
assert float(err) < 2e-2
