"""Text generation and perplexity on a loaded model: prefill, then one jitted decode step a token."""

from __future__ import annotations

import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.models.llama import decode_step, forward, init_cache


def sample_logits(logits, key, temperature: float = 0.0, top_p: float = 1.0):
    """Greedy for temperature 0, else temperature + nucleus (top-p) sampling. logits: [B, V]."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the best token)
        cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_ids=None, cache_dtype=None):
    """Generate after ``prompt_ids`` (list of ints). Returns (new token ids, stats dict)."""
    cfg = model.config
    dtype = jnp.dtype(model.compute_dtype)
    cache_dtype = jnp.dtype(cache_dtype or dtype)
    prompt = jnp.asarray([list(prompt_ids)], jnp.int32)
    max_len = prompt.shape[1] + max_new_tokens
    cache = init_cache(cfg, 1, max_len, cache_dtype)
    tp = getattr(model, "tp", None)  # loaded onto a mesh: run per shard, cache split by KV head
    if tp is not None:
        cache = jax.device_put(cache, tp.cache_sharding())
    key = jax.random.key(seed)
    eos = set(eos_ids or cfg.eos_token_id or ())
    t0 = time.perf_counter()
    logits, cache = decode_step(model.params, prompt, cache, 0, cfg, dtype, model.int8_threshold, tp=tp)
    key, sub = jax.random.split(key)
    token = sample_logits(logits, sub, temperature, top_p)
    token.block_until_ready()
    t_prefill = time.perf_counter() - t0
    out = [int(token[0])]
    t1, timed_from = time.perf_counter(), 0
    for i in range(max_new_tokens - 1):
        if out[-1] in eos:
            break
        logits, cache = decode_step(model.params, token[:, None].astype(jnp.int32), cache, prompt.shape[1] + i, cfg, dtype,
                                    model.int8_threshold, tp=tp)
        key, sub = jax.random.split(key)
        token = sample_logits(logits, sub, temperature, top_p)
        out.append(int(token[0]))
        if i == 0:  # the first one-token step compiles: the rate counts the steps after it
            t1, timed_from = time.perf_counter(), 1
    t_decode = time.perf_counter() - t1
    steps = len(out) - 1 - timed_from
    rate = steps / t_decode if steps > 0 and t_decode > 0 else float("nan")
    return out, {"prefill_s": t_prefill, "decode_s": t_decode, "decode_tokens_per_s": rate}


def perplexity(model, ids, window: Optional[int] = None, stride: Optional[int] = None):
    """Perplexity of ``ids`` under the model, as transformers computes a causal-LM loss.

    When the text fits ``window`` (default: the model's context) it is one window; otherwise
    sliding windows of ``window`` tokens advanced by ``stride``, each scoring only its new
    tokens. Returns (perplexity, tokens scored, seconds, description of the windowing).
    """
    cfg = model.config
    ids = np.asarray(ids, np.int32)
    window = int(window or cfg.max_position_embeddings)
    dtype = jnp.dtype(model.compute_dtype)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    if len(ids) <= window:
        spans = [(0, len(ids), 1)]
        how = f"one window of {len(ids)} tokens"
    else:
        stride = int(stride or window // 2)
        spans, prev_end = [], 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            spans.append((begin, end, max(prev_end - begin, 1)))
            prev_end = end
            if end == len(ids):
                break
        how = f"sliding windows of {window} tokens, stride {stride}"
    for begin, end, first_scored in spans:
        chunk = jnp.asarray(ids[None, begin:end])
        logits = forward(model.params, chunk, cfg, dtype, model.int8_threshold, tp=getattr(model, "tp", None))
        logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
        targets = chunk[0, 1:]
        token_nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        scored = token_nll[first_scored - 1:]
        nll += float(jnp.sum(scored))
        count += int(scored.shape[0])
    secs = time.perf_counter() - t0
    return math.exp(nll / count), count, secs, how
