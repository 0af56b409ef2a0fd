"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2) as pure functions over a parameter tree.

Every linear layer goes through ``lowbit_jax.ops.quantized_linear``, so the same code runs a
bf16/fp32 tree (kernels in Flax ``[in, out]`` layout) or a quantized one (``Packed4bit`` /
``RowwiseInt8`` in bitsandbytes' ``[out, in]`` layout); numerics live in ``ops``.

Parameter tree (layers stacked on a leading axis so one ``lax.scan`` compiles one layer)::

    {"embed": [V, H],
     "layers": {"input_norm": [L, H], "post_norm": [L, H],
                "q_proj": {"kernel": ..., "bias"?}, "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"},
     "norm": [H], "lm_head"?: {"kernel": ...}}
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from lowbit_jax import quant
from lowbit_jax.models.config import LlamaConfig
from lowbit_jax.nn.lora import lora_delta
from lowbit_jax.ops import LayerKernel, quantized_linear

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rms_norm(x, weight, eps):
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = config.rope_scaling_dict
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (HF convention). x: [B, T, heads, D]; positions: [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# a fixed number per projection: its LoRA dropout stream is fold_in(layer key, number)
_PROJ_IDS = {name: i for i, name in enumerate(
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def _linear(x, p, compute_dtype, int8_threshold, lora_scale=1.0, tp=None, path="", lora_dropout=0.0, rng=None):
    """One projection; with a tensor-parallel plan ``tp`` the weight at tree ``path`` runs per shard.
    ``lora_dropout`` with a key ``rng`` drops the adapter's input as PEFT does (training only)."""
    if tp is not None:
        y = tp.linear(x, p["kernel"], p.get("bias"), path, compute_dtype=compute_dtype, int8_threshold=int8_threshold)
    else:
        y = quantized_linear(x, p["kernel"], p.get("bias"), int8_threshold=int8_threshold, compute_dtype=compute_dtype)
    if "lora_A" in p:  # a LoRA adapter beside the frozen kernel (lowbit_jax.finetune): PEFT's W x + s x A B
        y = y + lora_delta(x, p["lora_A"], p["lora_B"], lora_scale, dropout=lora_dropout, rng=rng).astype(y.dtype)
    return y


def _named_linear(lp, compute_dtype, int8_threshold, lora_scale, tp, x, name, lora_dropout=0.0, rng=None):
    if rng is not None:
        rng = jax.random.fold_in(rng, _PROJ_IDS[name])
    return _linear(x, lp[name], compute_dtype, int8_threshold, lora_scale, tp, f"['layers']['{name}']['kernel']",
                   lora_dropout=lora_dropout, rng=rng)


def _attention(q, k, v, q_pos, k_pos, k_valid, config: LlamaConfig):
    """q: [B,T,Hq,D], k/v: [B,S,Hkv,D]; causal (and sliding-window) mask from positions."""
    groups = config.num_attention_heads // config.num_key_value_heads
    b, t, hq, d = q.shape
    q = q.reshape(b, t, config.num_key_value_heads, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if config.sliding_window:
        mask = mask & (k_pos[:, None, :] > q_pos[:, :, None] - config.sliding_window)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)
    return out.reshape(b, t, hq * d)


def _layer(h, lp, positions, cache_k, cache_v, cache_valid, write_pos, config, compute_dtype, int8_threshold,
           lora_scale=1.0, tp=None, lora_dropout=0.0, rng=None, layer_index=None):
    """One decoder layer. ``layer_index``: ``cache_k``/``cache_v`` are the whole stacked caches
    ``[L, B, S, H, D]``; the new keys and values are written into layer ``layer_index`` in place
    and the stacked caches returned (no per-layer cache slice in, stacked slice out)."""
    b, t, _ = h.shape
    lin = partial(_named_linear, lp, compute_dtype, int8_threshold, lora_scale, tp, lora_dropout=lora_dropout, rng=rng)
    x = rms_norm(h, lp["input_norm"], config.rms_norm_eps)
    q = lin(x, "q_proj").reshape(b, t, config.num_attention_heads, config.head_dim)
    k = lin(x, "k_proj").reshape(b, t, config.num_key_value_heads, config.head_dim)
    v = lin(x, "v_proj").reshape(b, t, config.num_key_value_heads, config.head_dim)
    inv_freq = rope_inv_freq(config)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if cache_k is None:
        keys, values, k_pos, k_valid = k, v, positions, jnp.ones(positions.shape, bool)
    elif layer_index is not None:
        zero = jnp.zeros((), jnp.int32)
        at = (jnp.asarray(layer_index, jnp.int32), zero, jnp.asarray(write_pos, jnp.int32), zero, zero)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
        keys, values = cache_k[layer_index], cache_v[layer_index]
        s = keys.shape[1]
        k_pos = jnp.broadcast_to(jnp.arange(s)[None, :], (b, s))
        k_valid = k_pos < write_pos + t
    else:
        keys = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), write_pos, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), write_pos, axis=1)
        s = keys.shape[1]
        k_pos = jnp.broadcast_to(jnp.arange(s)[None, :], (b, s))
        k_valid = k_pos < write_pos + t
        cache_k, cache_v = keys, values
    attn = _attention(q, keys, values, positions, k_pos, k_valid, config)
    h = h + lin(attn, "o_proj").astype(h.dtype)
    x = rms_norm(h, lp["post_norm"], config.rms_norm_eps)
    gate = lin(x, "gate_proj")
    up = lin(x, "up_proj")
    h = h + lin(jax.nn.silu(gate) * up, "down_proj").astype(h.dtype)
    return h, cache_k, cache_v


def _logits(params, h, config, compute_dtype, int8_threshold, tp=None):
    h = rms_norm(h, params["norm"], config.rms_norm_eps)
    if "lm_head" in params:
        return _linear(h, params["lm_head"], compute_dtype, int8_threshold, tp=tp,
                       path="['lm_head']['kernel']").astype(jnp.float32)
    emb = params["embed"]
    return jnp.einsum("bth,vh->btv", h.astype(compute_dtype), emb.astype(compute_dtype), preferred_element_type=jnp.float32)


@partial(jax.jit, static_argnames=("config", "compute_dtype", "int8_threshold", "remat", "lora_scale", "tp",
                                   "lora_dropout"))
def forward(params, tokens, config: LlamaConfig, compute_dtype=jnp.float32, int8_threshold: float = 6.0,
            remat: bool = False, lora_scale: float = 1.0, tp=None, lora_dropout: float = 0.0, dropout_rng=None):
    """Logits [B, T, V] (float32) for a full sequence, causal attention, no cache.

    ``tp`` (a ``lowbit_jax.sharding.TensorParallel``) runs the layers on its mesh: the params
    placed by ``tp.place`` (or ``load_pretrained(mesh=)``), split 4-bit projections multiplied
    shard by shard, the batch split over ``tp.batch_axis``.

    ``remat`` recomputes each layer in the backward pass (gradient checkpointing: one layer's
    activations live at a time); ``lora_scale`` (lora_alpha / r) scales any ``lora_A``/``lora_B``
    adapters found beside the layer kernels. ``lora_dropout`` > 0 with a key ``dropout_rng``
    drops each adapter's input (PEFT's ``lora_dropout``; one stream per layer and projection):
    for training steps, never for evaluation or decoding.
    """
    if lora_dropout > 0.0 and dropout_rng is None:
        raise ValueError("lora_dropout > 0 needs dropout_rng (a jax.random key)")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    h = jnp.take(params["embed"], tokens, axis=0).astype(compute_dtype)
    drop = lora_dropout > 0.0

    def body(h, xs):
        lp, key = xs if drop else (xs, None)
        h, _, _ = _layer(h, lp, positions, None, None, None, 0, config, compute_dtype, int8_threshold, lora_scale, tp,
                         lora_dropout=lora_dropout, rng=key)
        return h, None

    if remat:
        body = jax.checkpoint(body)
    layers = params["layers"]
    if drop:
        n_layers = jax.tree.leaves(layers)[0].shape[0]
        layers = (layers, jax.random.split(dropout_rng, n_layers))
    h, _ = jax.lax.scan(body, h, layers)
    return _logits(params, h, config, compute_dtype, int8_threshold, tp)


# Batch-1 one-token decode steps index the stacked layer weights instead of scanning over them
# (decode_step); False restores the plain scan (for comparisons).
LAYER_INDEXED_DECODE = True
# ... and write the new keys/values into the stacked cache in place (scan carry) instead of
# scanning over per-layer cache slices (a slice in, a stacked slice out, per layer and token).
INPLACE_CACHE = True


def _layer_at(layers, i):
    """Layer ``i`` of the stacked layer tree: 4-bit kernels as ``LayerKernel`` (read in place
    by the GEMV), everything else sliced (norms, adapters, other kernels)."""
    def one(leaf):
        if isinstance(leaf, quant.Packed4bit):
            return LayerKernel(leaf, i)
        return quant.layer_slice(leaf, i)

    return jax.tree.map(one, layers, is_leaf=lambda v: isinstance(v, quant.QuantizedTensor))


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16):
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@partial(jax.jit, static_argnames=("config", "compute_dtype", "int8_threshold", "lora_scale", "tp"),
         donate_argnames=("cache",))
def decode_step(params, tokens, cache, pos, config: LlamaConfig, compute_dtype=jnp.float32,
                int8_threshold: float = 6.0, lora_scale: float = 1.0, tp=None):
    """Run ``tokens`` [B, T] at positions pos..pos+T-1 against the KV cache.

    Returns (logits of the last token [B, V], updated cache). Prefill is T = prompt length,
    decoding is T = 1; both compile once per T. With ``tp`` (see :func:`forward`) place the
    cache with ``tp.cache_sharding()``.
    """
    b, t = tokens.shape
    positions = pos + jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    h = jnp.take(params["embed"], tokens, axis=0).astype(compute_dtype)

    if t * b == 1 and LAYER_INDEXED_DECODE:
        # One token: the scan carries the layer index, not the layer's weights. Scanning over
        # the stacked weights slices each layer out, which XLA copies before every custom call:
        # on an H100 (Llama-3-8B shapes) those copies took longer than the 4-bit GEMVs.
        layer_ids = jnp.arange(config.num_hidden_layers, dtype=jnp.int32)
        if INPLACE_CACHE:  # the stacked caches ride in the carry, written in place
            def body(carry, i):
                h, ks, vs = carry
                h, ks, vs = _layer(h, _layer_at(params["layers"], i), positions, ks, vs, None, pos, config,
                                   compute_dtype, int8_threshold, lora_scale, tp, layer_index=i)
                return (h, ks, vs), None

            (h, ks, vs), _ = jax.lax.scan(body, (h, cache["k"], cache["v"]), layer_ids)
        else:
            def body(h, xs):
                i, ck, cv = xs
                lp = _layer_at(params["layers"], i)
                h, ck, cv = _layer(h, lp, positions, ck, cv, None, pos, config, compute_dtype, int8_threshold,
                                   lora_scale, tp)
                return h, (ck, cv)

            h, (ks, vs) = jax.lax.scan(body, h, (layer_ids, cache["k"], cache["v"]))
    else:
        def body(h, xs):
            lp, ck, cv = xs
            h, ck, cv = _layer(h, lp, positions, ck, cv, None, pos, config, compute_dtype, int8_threshold,
                               lora_scale, tp)
            return h, (ck, cv)

        h, (ks, vs) = jax.lax.scan(body, h, (params["layers"], cache["k"], cache["v"]))
    logits = _logits(params, h[:, -1:, :], config, compute_dtype, int8_threshold, tp)[:, 0, :]
    if tp is not None:  # keep the cache where it came from (KV heads over the tensor axis)
        ks, vs = (jax.lax.with_sharding_constraint(a, tp.cache_sharding()) for a in (ks, vs))
    return logits, {"k": ks, "v": vs}


def init_params(config: LlamaConfig, key, dtype=jnp.float32, scale: float = 0.02):
    """Random parameters in the model's tree layout (Flax [in, out] kernels)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    qd = config.num_attention_heads * config.head_dim
    kvd = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, qd), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (qd, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {name: {"kernel": (jax.random.normal(k, (L, *s)) * scale).astype(dtype)} for (name, s), k in zip(shapes.items(), keys)}
    if config.attention_bias:
        for name, width in (("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)):
            layers[name]["bias"] = jnp.zeros((L, width), dtype)
    layers["input_norm"] = jnp.ones((L, h), dtype)
    layers["post_norm"] = jnp.ones((L, h), dtype)
    params = {"embed": (jax.random.normal(keys[-2], (config.vocab_size, h)) * scale).astype(dtype), "layers": layers,
              "norm": jnp.ones((h,), dtype)}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": (jax.random.normal(keys[-1], (h, config.vocab_size)) * scale).astype(dtype)}
    return params
