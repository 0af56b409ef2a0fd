"""QLoRA with lowbit-jax: NF4 base weights, LoRA adapters, one jitted train step."""
import flax.linen as nn, jax, jax.numpy as jnp, optax
from lowbit_jax.nn import LoraConfig, QuantConfig, add_lora, combine, prepare_for_kbit_training, print_trainable_parameters, quantize_params, split_trainable
from lowbit_jax.nn.linen import quant_context

class MLP(nn.Module):  # any Linen model with nn.Dense layers, unmodified
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="down_proj")(nn.gelu(nn.Dense(256, name="up_proj")(nn.Dense(256, name="q_proj")(x))))

model, x = MLP(), jax.random.normal(jax.random.key(0), (64, 128))
y = jnp.sin(x[:, :16] * 3.0)
params = model.init(jax.random.key(1), x)["params"]
params, report = quantize_params(params, QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, min_size=0))
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "up_proj", "down_proj"])
params = prepare_for_kbit_training(add_lora(params, lora, jax.random.key(2)))
print_trainable_parameters(params)
trainable, frozen = split_trainable(params)  # the 4-bit bases stay frozen, outside jax.grad
opt = optax.adamw(1e-2); opt_state = opt.init(trainable)

@jax.jit
def train_step(trainable, opt_state, key):
    def loss_fn(t):
        with quant_context(lora=lora, deterministic=False):
            return jnp.mean((model.apply({"params": combine(t, frozen)}, x, rngs={"dropout": key}) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

loss0 = train_step(trainable, opt_state, jax.random.key(0))[2]  # loss before any update
for step in range(200):
    trainable, opt_state, loss = train_step(trainable, opt_state, jax.random.key(step))
print(f"{report.bytes_before:,} -> {report.bytes_after:,} bytes; loss {float(loss0):.4f} -> {float(loss):.4f}")
