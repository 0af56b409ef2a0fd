"""Does 8-bit AdamW train a language model like 32-bit AdamW? A small byte-level transformer on
real English text (the Python docs shipped in the standard library, ``pydoc_data.topics``).

Each optimizer trains from the same initialisations (several seeds) on the same batches; the
held-out loss curves are plotted to ``benchmarks/optim_convergence.png`` and the final losses
printed. "Within noise" means: the gap between the optimizers' mean final losses is no larger
than the spread across seeds of one optimizer. CPU, a few minutes:

    python benchmarks/optim_convergence.py [--steps 300] [--seeds 3]   # plot needs matplotlib
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax.optim import adamw8bit

HERE = os.path.dirname(os.path.abspath(__file__))


def corpus() -> np.ndarray:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.d)(h)
        return x + nn.Dense(self.d)(nn.gelu(h))


class TinyLM(nn.Module):
    d: int = 128
    layers: int = 2
    heads: int = 4
    seq: int = 128

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(256, self.d)(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (self.seq, self.d))[: tokens.shape[1]]
        for _ in range(self.layers):
            x = Block(self.d, self.heads)(x)
        return nn.Dense(256)(nn.LayerNorm()(x))


def batches(data, steps, batch, seq, seed):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq - 1, size=(steps, batch))
    idx = starts[..., None] + np.arange(seq + 1)
    return data[idx]


def train(tx, params, model, train_batches, eval_batch, eval_every):
    def loss_fn(p, b):
        logits = model.apply(p, b[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

    @jax.jit
    def step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    eval_loss = jax.jit(loss_fn)
    state = tx.init(params)
    curve = []
    for i, b in enumerate(train_batches):
        params, state, _ = step(params, state, jnp.asarray(b, jnp.int32))
        if (i + 1) % eval_every == 0 or i == 0:
            curve.append((i + 1, float(eval_loss(params, jnp.asarray(eval_batch, jnp.int32)))))
    return curve


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--png", default=os.path.join(HERE, "optim_convergence.png"))
    args = ap.parse_args()

    data = corpus()
    split = int(len(data) * 0.95)
    train_data, eval_data = data[:split], data[split:]
    model = TinyLM()
    eval_batch = batches(eval_data, 1, 64, model.seq, seed=1234)[0]
    warmup = min(30, args.steps // 4)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr * 0.1)
    optimizers = {
        "optax.adamw (fp32 states)": lambda: optax.adamw(sched, weight_decay=1e-2),
        "lowbit_jax adamw8bit": lambda: adamw8bit(sched, weight_decay=1e-2, fused=False),
    }
    print(f"{len(data)} bytes of text; {args.steps} steps x batch {args.batch} x {model.seq} tokens")
    curves = {name: [] for name in optimizers}
    for seed in range(args.seeds):
        params = model.init(jax.random.key(seed), jnp.zeros((1, model.seq), jnp.int32))
        if seed == 0:
            n = sum(x.size for x in jax.tree.leaves(params))
            print(f"model: {n} parameters")
        train_batches = batches(train_data, args.steps, args.batch, model.seq, seed=100 + seed)
        for name, make in optimizers.items():
            t0 = time.perf_counter()
            curve = train(make(), params, model, train_batches, eval_batch, args.eval_every)
            curves[name].append(curve)
            print(f"seed {seed} {name:28s} eval loss {curve[0][1]:.3f} -> {curve[-1][1]:.4f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    finals = {name: np.array([c[-1][1] for c in cs]) for name, cs in curves.items()}
    names = list(optimizers)
    gap = abs(finals[names[0]].mean() - finals[names[1]].mean())
    spread = max(float(np.ptp(f)) for f in finals.values())
    for name in names:
        print(f"{name:28s} final eval loss mean {finals[name].mean():.4f} (seeds: "
              + ", ".join(f"{x:.4f}" for x in finals[name]) + ")")
    print(f"gap between optimizers {gap:.4f}; spread across seeds {spread:.4f}; "
          f"within noise: {gap <= max(spread, 1e-9)}")

    try:
        import matplotlib
    except ImportError:  # the plot needs `pip install matplotlib`; the numbers above do not
        print("matplotlib is not installed: no PNG written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color in zip(names, ("tab:blue", "tab:orange")):
        for k, curve in enumerate(curves[name]):
            steps, losses = zip(*curve)
            ax.plot(steps, losses, color=color, alpha=0.8, lw=1.5, ls="-" if k == 0 else "--",
                    label=f"{name}" if k == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"Byte-level transformer on pydoc_data.topics ({args.seeds} seeds, dashed = other seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = args.png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.png)
    with open(os.path.splitext(args.png)[0] + ".json.tmp", "w") as f:
        json.dump({"curves": curves, "steps": args.steps, "seeds": args.seeds}, f)
    os.replace(os.path.splitext(args.png)[0] + ".json.tmp", os.path.splitext(args.png)[0] + ".json")
    print("saved", args.png)


if __name__ == "__main__":
    main()
