"""Quantize an existing Flax model without touching its code: rules over module paths, a report."""
import flax.linen as nn, jax, jax.numpy as jnp
from lowbit_jax.nn import QuantConfig, memory_footprint, quantize_params
from lowbit_jax.nn.linen import quant_context

class MLPBlock(nn.Module):  # any Linen model built from nn.Dense
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = x + nn.Dense(512, name=f"layers_{i}_down")(nn.gelu(nn.Dense(2048, name=f"layers_{i}_up")(x)))
        return nn.Dense(1000, name="lm_head")(x)

model, x = MLPBlock(), jax.random.normal(jax.random.key(0), (4, 512))
params = model.init(jax.random.key(1), x)["params"]
config = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="float32",
                     exclude=(r"layers_0_",))  # regexes on module paths; lm_head is skipped by default
qparams, report = quantize_params(params, config)
print(report)  # which layers were quantized, which kept and why, bytes before/after

with quant_context():  # nn.Dense layers whose kernel is quantized run the 4-bit matmul
    y_q = model.apply({"params": qparams}, x)
y = model.apply({"params": params}, x)
rel = float(jnp.linalg.norm(y_q - y) / jnp.linalg.norm(y))
print(f"{memory_footprint(params).total_bytes:,} -> {memory_footprint(qparams).total_bytes:,} bytes; "
      f"output relative change {rel:.3f} (NF4 rounding in 4 of 7 random layers)")
assert rel < 0.25
