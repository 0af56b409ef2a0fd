"""adamw8bit: optax.adamw with 8-bit states (~2 bytes a parameter instead of 8), in a jitted step."""
import jax, jax.numpy as jnp, optax
from lowbit_jax.optim import adamw8bit, state_nbytes

key_w, key_x = jax.random.split(jax.random.key(0))
params = {"w": jax.random.normal(key_w, (512, 512)) * 0.05, "b": jnp.zeros((512,))}
x = jax.random.normal(key_x, (256, 512))
y = jnp.tanh(x @ jax.random.normal(jax.random.key(1), (512, 512)) * 0.05)

opt = adamw8bit(learning_rate=3e-3, weight_decay=1e-2)  # drop-in for optax.adamw(3e-3, weight_decay=1e-2)
opt_state = opt.init(params)

@jax.jit
def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

losses = []
for _ in range(100):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
print(f"optimizer state: {state_nbytes(opt_state):,} bytes (8-bit) vs "
      f"{state_nbytes(optax.adamw(3e-3).init(params)):,} (optax fp32)")  # the 512-element bias stays fp32
assert losses[-1] < 0.5 * losses[0]
