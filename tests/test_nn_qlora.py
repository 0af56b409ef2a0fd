"""QLoRA end to end: a small Linen transformer learns a synthetic task with NF4 bases and
LoRA adapters, to within 5% of the same run on a bf16 base; the README snippet runs."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax.nn import LoraConfig, QuantConfig, add_lora, combine, prepare_for_kbit_training, quantize_params, split_trainable
from lowbit_jax.nn.linen import quant_context

V, D, T, LAYERS = 32, 64, 12, 2


class Block(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, h):
        a = nn.RMSNorm(dtype=self.dtype, name="input_layernorm")(h)
        q, k, v = (nn.Dense(D, dtype=self.dtype, name=n)(a) for n in ("q_proj", "k_proj", "v_proj"))
        mask = jnp.tril(jnp.ones((T, T), bool))
        att = jnp.where(mask, q @ k.swapaxes(-1, -2) / np.sqrt(D), -1e9)
        h = h + nn.Dense(D, dtype=self.dtype, name="o_proj")(jax.nn.softmax(att.astype(jnp.float32)).astype(self.dtype) @ v)
        m = nn.RMSNorm(dtype=self.dtype, name="post_attention_layernorm")(h)
        return h + nn.Dense(D, dtype=self.dtype, name="down_proj")(nn.gelu(nn.Dense(2 * D, dtype=self.dtype, name="up_proj")(m)))


class TinyLM(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, dtype=self.dtype, name="embed_tokens")(ids) + self.param(
            "pos", nn.initializers.normal(0.02), (T, D)
        ).astype(self.dtype)
        for i in range(LAYERS):
            h = nn.remat(Block)(self.dtype, name=f"layers_{i}")(h)
        return nn.Dense(V, dtype=self.dtype, name="lm_head")(nn.RMSNorm(dtype=self.dtype, name="norm")(h))


def _batch(key):
    ids = jax.random.randint(key, (32, T), 0, V)
    # target: the token two positions back, times 5, mod V (needs attention and a token map)
    prev = jnp.roll(ids, 2, axis=1)
    return ids, (prev * 5 + 3) % V


def _train(params, dtype, lora, steps=300):
    trainable, frozen = split_trainable(params)
    opt = optax.adamw(3e-3)
    state = opt.init(trainable)
    model = TinyLM(dtype=dtype)

    def loss_fn(t, ids, tgt):
        with quant_context(lora=lora):
            logits = model.apply({"params": combine(t, frozen)}, ids).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, 2:], tgt[:, 2:]).mean()

    @jax.jit
    def step(t, s, key):
        ids, tgt = _batch(key)
        loss, g = jax.value_and_grad(loss_fn)(t, ids, tgt)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    losses = []
    for i in range(steps):
        trainable, state, loss = step(trainable, state, jax.random.key(1000 + i))
        losses.append(float(loss))
    return np.mean(losses[-20:]), losses[0]


def test_qlora_matches_bf16_lora_on_synthetic_task():
    fp = TinyLM().init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*(q|k|v|o|up|down)_proj")
    qcfg = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="bfloat16", min_size=0)
    qp, report = quantize_params(fp, qcfg)
    assert len(report.quantized) == 6 * LAYERS
    q_final, q_first = _train(prepare_for_kbit_training(add_lora(qp, lora, jax.random.key(7))), jnp.bfloat16, lora)
    bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16), fp)
    b_final, b_first = _train(prepare_for_kbit_training(add_lora(bf, lora, jax.random.key(7))), jnp.bfloat16, lora)
    print(f"QLoRA nf4: {q_first:.3f} -> {q_final:.3f}; bf16 LoRA: {b_first:.3f} -> {b_final:.3f}")
    assert b_final < 0.5 * b_first, "the task must actually be learned"
    assert abs(q_final - b_final) <= 0.05 * b_final


def test_readme_snippet_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "snippets", "qlora.py")
    out = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("trainable params: ")
    first, last = (float(v) for v in lines[-1].split("loss ")[1].split(" -> "))
    assert last < 0.7 * first, out.stdout
