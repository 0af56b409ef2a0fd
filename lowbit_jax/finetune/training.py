"""The QLoRA training step and loop over the stacked-layer decoder: loss, step, eval, progress.

One jitted step differentiates only the adapters (``split_trainable``: the frozen tree holds
uint8 NF4 codes, which ``jax.grad`` cannot take and which must never get an optimizer state),
recomputes each decoder layer in the backward pass (``remat``: gradient checkpointing, one
layer's activations alive at a time) and keeps the frozen base out of the donated buffers.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from functools import partial
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax.models.config import LlamaConfig
from lowbit_jax.models.llama import forward
from lowbit_jax.nn.lora import combine, split_trainable


def masked_nll(logits, targets, mask):
    """(sum of -log p(target) over masked positions, count): fp32, what loss and perplexity share."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_loss(config: LlamaConfig, compute_dtype, lora_scale: float, remat: bool = True,
              lora_dropout: float = 0.0) -> Callable:
    """``loss(trainable, frozen, batch) -> mean NLL`` over the batch's assistant tokens.

    ``lora_dropout`` > 0 drops the adapters' inputs with the key ``batch["dropout_key"]``
    (``train`` puts a fresh one in every batch)."""

    def loss_fn(trainable, frozen, batch):
        params = combine(trainable, frozen)
        key = batch.get("dropout_key") if lora_dropout > 0.0 else None
        if lora_dropout > 0.0 and key is None:
            raise ValueError("lora_dropout > 0: the batch needs a 'dropout_key' (a jax.random key per step)")
        logits = forward(params, batch["tokens"], config, compute_dtype, remat=remat, lora_scale=lora_scale,
                         lora_dropout=lora_dropout, dropout_rng=key)
        total, count = masked_nll(logits, batch["targets"], batch["mask"])
        return total / jnp.maximum(count, 1.0)

    return loss_fn


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``, jitted;
    the adapters and optimizer state are donated (updated in place), the frozen base is not."""

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def make_eval(config: LlamaConfig, compute_dtype, lora_scale: float) -> Callable:
    """``eval(params, batch) -> (NLL sum [B], token count [B])`` per row, jitted."""

    @jax.jit
    def nll(params, batch):
        logits = forward(params, batch["tokens"], config, compute_dtype, lora_scale=lora_scale)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = -jnp.take_along_axis(logp, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(tok * mask, axis=-1), jnp.sum(mask, axis=-1)

    return nll


def row_nll(eval_fn, params, data, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (NLL sum, assistant-token count) over ``data`` (a TokenizedSet), in order."""
    sums, counts = [], []
    for b in data.batches(batch_size):
        s, c = eval_fn(params, b)
        sums.append(np.asarray(s, np.float64))
        counts.append(np.asarray(c, np.float64))
    n = len(data)
    return np.concatenate(sums)[:n], np.concatenate(counts)[:n]


def perplexity(eval_fn, params, data, batch_size: int) -> float:
    """exp(mean NLL) over every assistant token of ``data`` (a TokenizedSet)."""
    s, c = row_nll(eval_fn, params, data, batch_size)
    return math.exp(s.sum() / max(c.sum(), 1.0))


def memory_in_use() -> tuple[str, float]:
    """(label, GB): the accelerator's peak bytes in use if it reports them, else the process's
    peak host RSS (CPU backends report no allocator statistics)."""
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return "peak device", stats["peak_bytes_in_use"] / 1e9
    return "peak host RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


@dataclasses.dataclass
class TrainResult:
    trainable: dict
    losses: list  # per step
    tokens_per_s: float  # target (assistant) tokens per second, after the first (compiling) step
    seconds: float
    memory: tuple


def train(step_fn, trainable, opt_state, frozen, data, *, steps: int, batch_size: int, seed: int = 0,
          desc: str = "train", progress: bool = True, log: Optional[Callable] = None) -> TrainResult:
    """Run ``steps`` steps over shuffled epochs of ``data``, with a tqdm bar showing the loss,
    tokens/s (all positions of the batch, padding included, as trainers count) and memory."""
    from tqdm.auto import tqdm

    losses, t_first, tokens_after_first = [], None, 0
    dropout_root = jax.random.key(seed + 7919)
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    epoch = 0
    done = 0
    while done < steps:
        for batch in data.batches(batch_size, seed=seed * 1000 + epoch, drop_last=len(data) >= batch_size):
            # a fresh LoRA-dropout key every step (unused by a loss without dropout)
            batch = dict(batch, dropout_key=jax.random.fold_in(dropout_root, done))
            trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch)
            loss = float(loss)  # syncs: the timing below is of finished steps
            losses.append(loss)
            done += 1
            if t_first is None:
                t_first = time.perf_counter()
            else:
                tokens_after_first += batch["tokens"].size
            rate = tokens_after_first / max(time.perf_counter() - t_first, 1e-9)
            label, gb = memory_in_use()
            bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} tok/s, {label} {gb:.2f} GB")
            bar.update(1)
            if log is not None:
                log(done, loss)
            if done >= steps:
                break
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - t0
    rate = tokens_after_first / max(time.perf_counter() - t_first, 1e-9) if tokens_after_first else float("nan")
    return TrainResult(trainable, losses, rate, seconds, memory_in_use())


def setup(params, optimizer: optax.GradientTransformation):
    """``(trainable, frozen, opt_state)`` for a tree holding adapters.

    The adapters are copied (they are small): the step donates its ``trainable``, and the
    caller's ``params`` must stay usable (to evaluate the model before training, say)."""
    trainable, frozen = split_trainable(params)
    if not trainable:
        raise ValueError("the tree holds no lora_A/lora_B adapters; add them first (finetune.add_adapters)")
    trainable = jax.tree.map(jnp.copy, trainable)
    opt_state = optimizer.init(trainable)
    # committed to where they lie: the step returns committed arrays, and a jitted function
    # called with uncommitted ones first compiles a second time on its second call
    commit = lambda x: jax.device_put(x, x.sharding) if isinstance(x, jax.Array) else x  # noqa: E731
    return jax.tree.map(commit, trainable), frozen, jax.tree.map(commit, opt_state)


def count(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
