"""Tensor-parallel NF4 decode and a QLoRA step on 1 vs N GPUs: tokens/s and scaling efficiency.

The model is Llama-3-8B-shaped with random weights drawn *directly on the mesh*: for each
linear layer of each decoder layer, a jitted RNG draws the bf16 weight with the split's
``out_shardings`` (so a device draws only its own shard -- threefry is partitionable, and the
values do not depend on the mesh), then ``sharding_io.quantize_sharded`` quantizes it shard by
shard into NF4 + double quant. At no point does a device hold more than one layer's bf16 shard;
the 8B bf16 model never exists anywhere. Same seed, same weights on 1 and N GPUs, so their
logits must agree (checked and reported: correctness before speed).

Runs, each in its own process (so each memory peak is its own):
  * ``tp1``: one GPU -- the baseline of everything;
  * ``tpN``: tensor parallel over N GPUs (``LLAMA_TP_RULES`` + the LM head split by vocab):
    batch-1 decode tokens/s, and a QLoRA step (batch 1);
  * ``dpN``: data parallel over N GPUs (every GPU the whole NF4 model, batch N): QLoRA only.
QLoRA step: LoRA r=16 on q_proj and v_proj, ``adamw8bit``, bf16 compute, gradient checkpointing
(remat of the scanned layer), sequence ``--seq`` (2048).

Method (DESIGN.md, "How we measure"): one ``jit`` holds the whole model (all layers scanned), so
a timed call is device work, not dispatch; ``--calls`` calls are queued back to back (decode
steps chained through the donated KV cache, training steps through the optimizer state) and the
clock is read once after the last finishes; the median over ``--trials`` of the mean per call is
reported. Inputs are fresh random tokens. HBM copy bandwidth is measured in the same run; decode
reports the bandwidth its weight bytes imply and that as a % of the copy bandwidth. Scaling
efficiency = speedup / N (ideal 1.0); for data parallel, (tokens/s on N) / (N x tokens/s on 1).

    python benchmarks/bench_sharded.py                      # GPU: 1 vs all GPUs (up to 8), 8B shape
    python benchmarks/bench_sharded.py --gpus 1,2 --json out.json
    python benchmarks/bench_sharded.py --tiny               # CPU smoke run (forces 2 host devices)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

PRESETS = {
    "llama3-8b": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                      rope_theta=500000.0, seq=2048, prompt=128, decode_calls=32),
    "tiny": dict(vocab=512, hidden=256, inter=512, layers=1, heads=4, kv_heads=2, head_dim=64,
                 rope_theta=10000.0, seq=64, prompt=8, decode_calls=2),
}
LORA_TARGETS = ("q_proj", "v_proj")
LORA_R = 16


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ------------------------------------------------------------------------------------------------
# One run (a subprocess, or in-process for --tiny)
# ------------------------------------------------------------------------------------------------


def _config(p):
    from lowbit_jax.models.config import LlamaConfig

    return LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                       num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"], rope_theta=p["rope_theta"],
                       max_position_embeddings=8192, rms_norm_eps=1e-5)


def build_params(cfg, tp, key):
    """Random NF4(+DQ) decoder weights drawn and quantized shard by shard on ``tp.mesh``."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lowbit_jax import sharding_io
    from lowbit_jax.nn.config import QuantConfig

    qcfg = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, blocksize=64)
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out_in = {"q_proj": (qd, h), "k_proj": (kvd, h), "v_proj": (kvd, h), "o_proj": (h, qd),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    mesh = tp.mesh

    draws = {}

    def draw(shape, spec):  # one compiled RNG per (shape, split)
        if (shape, spec) not in draws:
            draws[shape, spec] = jax.jit(lambda k: jax.random.normal(k, shape, jnp.bfloat16) * 0.02,
                                         out_shardings=NamedSharding(mesh, spec))
        return draws[shape, spec]

    layers = {}
    for n, (name, shape) in enumerate(out_in.items()):
        axis = tp.split(f"['layers']['{name}']['kernel']")
        f = draw(shape, sharding_io.split_spec(axis, tp.axis))
        per_layer = []
        for layer in range(L):
            w = f(jax.random.fold_in(key, n * 1000 + layer))
            per_layer.append(sharding_io.quantize_sharded(w, qcfg, mesh, axis, tp.axis))
            del w
        layers[name] = {"kernel": sharding_io.stack_sharded(per_layer)}
        del per_layer
    rep = NamedSharding(mesh, P())
    layers["input_norm"] = jax.device_put(jnp.ones((L, h), jnp.bfloat16), rep)
    layers["post_norm"] = jax.device_put(jnp.ones((L, h), jnp.bfloat16), rep)
    ke, kh = jax.random.split(jax.random.fold_in(key, 99))
    embed = draw((cfg.vocab_size, h), P())(ke)
    # The LM head stays bf16 (bitsandbytes' default) and splits by vocabulary: [in, out] kernel.
    head_axis = tp.split("['lm_head']['kernel']")
    lm_head = draw((h, cfg.vocab_size), P(None, tp.axis) if head_axis == "out" else P())(kh)
    params = {"embed": embed, "layers": layers, "norm": jax.device_put(jnp.ones((h,), jnp.bfloat16), rep),
              "lm_head": {"kernel": lm_head}}
    return jax.block_until_ready(params)


def _add_lora(params, cfg, tp, key):
    import jax
    import jax.numpy as jnp

    from lowbit_jax import sharding

    L = cfg.num_hidden_layers
    lora = {"layers": {}}
    for n, name in enumerate(LORA_TARGETS):
        out_f, in_f = params["layers"][name]["kernel"].shape
        ka, kb = jax.random.split(jax.random.fold_in(key, n))
        a = jax.random.uniform(ka, (L, in_f, LORA_R), jnp.float32, -1 / in_f ** 0.5, 1 / in_f ** 0.5)
        # B random (not PEFT's zeros) so the first timed step already back-propagates through A.
        b = jax.random.normal(kb, (L, LORA_R, out_f), jnp.float32) * 1e-3
        lora["layers"][name] = {"lora_A": a, "lora_B": b}
    return sharding.shard_tree(lora, tp.mesh, tp.rules, tp.axis)


def _timed(fn, state, calls, trials):
    """Median over trials of (wall time of ``calls`` chained calls) / calls; returns (s, state)."""
    import jax

    per = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            state = fn(state)
        jax.block_until_ready(state)
        per.append((time.perf_counter() - t0) / calls)
    return _median(per), state


def copy_bandwidth(nbytes, calls, trials):
    """HBM copy bandwidth (read + write bytes / s) of one device, this run."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    x = jax.device_put(jax.random.normal(jax.random.key(7), (nbytes // 4,), jnp.float32), dev)
    f = jax.jit(lambda x: x * jnp.float32(1.0000001))
    jax.block_until_ready(f(x))
    s, _ = _timed(f, x, calls, trials)
    return 2 * x.nbytes / s


def _mem_peak(devices):
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return None if any(p is None for p in peaks) else max(peaks) / 1e9


def run_one(job: dict) -> dict:
    """One configuration: ``job`` = {preset, n, mode ('tp'|'dp'), seq, calls, trials, out}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh

    from lowbit_jax import sharding
    from lowbit_jax.models import llama
    from lowbit_jax.nn.lora import combine
    from lowbit_jax.optim import adamw8bit
    from lowbit_jax.quant import footprint

    jax.config.update("jax_threefry_partitionable", True)  # shard-local draws, mesh-independent values
    p = dict(PRESETS[job["preset"]])
    if job.get("layers"):
        p["layers"] = job["layers"]
    cfg = _config(p)
    n, mode = job["n"], job["mode"]
    devices = jax.devices()[:n]
    if len(devices) < n:
        raise RuntimeError(f"asked for {n} devices, {len(jax.devices())} visible")
    if mode == "tp":
        mesh = Mesh(np.array(devices).reshape(1, n), ("dp", "tp"))
    else:
        mesh = Mesh(np.array(devices).reshape(n, 1), ("dp", "tp"))
    rules = sharding.LLAMA_TP_RULES + ((r"\['lm_head'\]", "out"),)
    tp = sharding.TensorParallel(mesh, rules, "tp", batch_axis="dp")
    res = {"n": n, "mode": mode, "device": devices[0].device_kind, "platform": devices[0].platform,
           "jax": jax.__version__}
    t0 = time.perf_counter()
    params = build_params(cfg, tp, jax.random.key(0))
    res["build_s"] = time.perf_counter() - t0
    res["weights_GB_total"] = footprint(params).total_bytes / 1e9
    res["weights_GB_per_device"] = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards
                                       if s.device == devices[0]) / 1e9
    res["peak_after_build_GB"] = _mem_peak(devices)
    calls, trials = job["calls"], job["trials"]
    rng = np.random.default_rng(1)
    dtype = jnp.bfloat16

    # ---- decode (tensor parallel only: batch 1) ----
    if mode == "tp":
        res["copy_GBps"] = copy_bandwidth(job["copy_bytes"], 20, trials) / 1e9
        # A context of ``prompt`` tokens already in the cache (its content does not change the
        # work), then T=1 steps: one compile, every timed call a real decode step.
        context, steps = p["prompt"], calls * trials + 2
        cache = jax.device_put(llama.init_cache(cfg, 1, context + steps, dtype), tp.cache_sharding())
        tok = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 1)), jnp.int32)
        t0 = time.perf_counter()
        logits, cache = llama.decode_step(params, tok, cache, context, cfg, dtype, tp=tp)
        first = np.asarray(jax.device_get(logits), np.float32)[0]
        res["decode_compile_s"] = time.perf_counter() - t0
        if not np.all(np.isfinite(first)):
            raise FloatingPointError("non-finite decode logits")
        np.save(os.path.join(job["out"], f"logits_{mode}{n}.npy"), first)
        pos = [context + 1]

        def decode(c):
            _, c = llama.decode_step(params, tok, c, pos[0], cfg, dtype, tp=tp)
            pos[0] += 1
            return c

        cache = decode(cache)
        s, cache = _timed(decode, cache, calls, trials)
        res["decode_context"] = context
        res["decode_s_per_token"] = s
        res["decode_tokens_per_s"] = 1.0 / s
        # Bytes one device reads per token: its shards of every weight but the embedding table
        # (one row of it is read).
        read = sum(sh.data.nbytes for k, v in params.items() if k != "embed" for x in jax.tree.leaves(v)
                   for sh in x.addressable_shards if sh.device == devices[0])
        res["decode_GB_read_per_device"] = read / 1e9
        res["decode_GBps_per_device"] = read / 1e9 / s
        res["decode_pct_of_copy_bw"] = 100 * res["decode_GBps_per_device"] / res["copy_GBps"]
        del cache

    # ---- QLoRA step ----
    seq, batch = job["seq"], (n if mode == "dp" else 1)
    trainable = _add_lora(params, cfg, tp, jax.random.key(2))
    opt = adamw8bit(2e-4)
    p_sh = jax.tree.map(lambda x: x.sharding, trainable)
    s_sh = sharding.state_shardings(jax.eval_shape(opt.init, trainable), p_sh)
    opt_state = jax.jit(opt.init, out_shardings=s_sh)(trainable)
    scale = 32.0 / LORA_R

    def loss_fn(tr, frozen, tokens):
        logits = llama.forward(combine(tr, frozen), tokens[:, :-1], cfg, dtype, remat=True, lora_scale=scale, tp=tp)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    def train_step(tr, st, frozen, tokens):
        loss, g = jax.value_and_grad(loss_fn)(tr, frozen, tokens)
        upd, st = opt.update(g, st, tr)
        return optax.apply_updates(tr, upd), st, loss

    train_step = jax.jit(train_step, out_shardings=(p_sh, s_sh, None))
    tokens = jax.device_put(jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq + 1)), jnp.int32),
                            tp.batch_sharding())
    t0 = time.perf_counter()
    compiled = train_step.lower(trainable, opt_state, params, tokens).compile()
    res["qlora_compile_s"] = time.perf_counter() - t0
    a0 = np.asarray(jax.device_get(trainable["layers"]["q_proj"]["lora_A"]))
    trainable, opt_state, loss = compiled(trainable, opt_state, params, tokens)
    res["qlora_first_loss"] = float(loss)
    losses = []

    def step(carry):
        tr, st = carry
        tr, st, l = compiled(tr, st, params, tokens)
        losses.append(l)
        return tr, st

    s, (trainable, opt_state) = _timed(step, (trainable, opt_state), job["steps"], trials)
    losses = [float(x) for x in losses]
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite QLoRA loss: {losses[:5]}")
    if np.array_equal(np.asarray(jax.device_get(trainable["layers"]["q_proj"]["lora_A"])), a0):
        raise AssertionError("the adapters did not change: no gradient reached LoRA")
    res.update(qlora_batch=batch, qlora_seq=seq, qlora_step_s=s, qlora_tokens_per_s=batch * seq / s,
               qlora_last_loss=losses[-1], peak_GB=_mem_peak(devices))
    return res


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------


def _jobs(ns, modes, preset, seq, calls, steps, trials, out, copy_bytes, layers=None):
    jobs = []
    for n in ns:
        for mode in (("tp",) if n == 1 else modes):
            jobs.append(dict(preset=preset, n=n, mode=mode, seq=seq, calls=calls, steps=steps, trials=trials, out=out,
                             copy_bytes=copy_bytes, layers=layers))
    return jobs


def _spawn(job):
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # peaks are the allocator's, not the pool's
    cmd = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        return {"n": job["n"], "mode": job["mode"], "error": (r.stderr or r.stdout)[-3000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(results, out):
    """Scaling efficiencies against the 1-device run, and logits agreement across meshes."""
    import numpy as np

    base = next((r for r in results if r.get("n") == 1 and "error" not in r), None)
    ref = os.path.join(out, "logits_tp1.npy")
    for r in results:
        if base is None or "error" in r:
            continue
        n = r["n"]
        if "decode_tokens_per_s" in r:
            r["decode_speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            r["decode_efficiency"] = r["decode_speedup"] / n
            mine = os.path.join(out, f"logits_{r['mode']}{n}.npy")
            if n > 1 and os.path.exists(ref) and os.path.exists(mine):
                a, b = np.load(mine), np.load(ref)
                r["logits_max_abs_diff_vs_1"] = float(np.max(np.abs(a - b)))
                r["logits_rel_diff_vs_1"] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))
                r["logits_agree"] = bool(r["logits_rel_diff_vs_1"] < 5e-2)  # bf16 compute, other summation order
                r["argmax_same_as_1"] = bool(np.argmax(a) == np.argmax(b))
        r["qlora_speedup"] = r["qlora_tokens_per_s"] / base["qlora_tokens_per_s"]
        r["qlora_efficiency"] = r["qlora_speedup"] / n
    return results


def table(results) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| GPUs | mode | decode tok/s | decode eff. | % copy BW | QLoRA tok/s (batch) | QLoRA eff. | "
             "peak GB/dev | logits vs 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['mode']} | error: {r['error'].strip().splitlines()[-1][:80]} |||||||")
            continue
        agree = r.get("logits_agree")
        lines.append(
            f"| {r['n']} | {r['mode']} | {f(r.get('decode_tokens_per_s'), '.1f')} | {f(r.get('decode_efficiency'), '.2f')} | "
            f"{f(r.get('decode_pct_of_copy_bw'), '.0f')} | {r['qlora_tokens_per_s']:.0f} ({r['qlora_batch']}) | "
            f"{f(r.get('qlora_efficiency'), '.2f')} | {f(r.get('peak_GB'), '.1f')} | "
            f"{'-' if agree is None else ('ok' if agree else 'MISMATCH')} "
            f"{'' if agree is None else format(r['logits_rel_diff_vs_1'], '.1e')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU, in-process (a smoke test of this script)")
    ap.add_argument("--gpus", default=None, help="comma-separated device counts (default: 1 and all, up to 8)")
    ap.add_argument("--seq", type=int, default=None, help="QLoRA sequence length (default 2048; tiny 64)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count (quick checks)")
    ap.add_argument("--modes", default="tp,dp", help="for N > 1: tp (tensor parallel), dp (data parallel)")
    ap.add_argument("--calls", type=int, default=None, help="chained decode steps per timing trial")
    ap.add_argument("--steps", type=int, default=3, help="chained QLoRA steps per timing trial")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out-dir", default=None, help="keep each configuration's result here; results already "
                    "there from an earlier invocation (e.g. --gpus 1) are summarized with the new ones")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.job:  # a child process: one configuration, result as the last stdout line
        print(json.dumps(run_one(json.loads(args.job))))
        return None
    if args.tiny and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    import jax

    preset = "tiny" if args.tiny else "llama3-8b"
    p = PRESETS[preset]
    count = jax.device_count()
    ns = [int(x) for x in args.gpus.split(",")] if args.gpus else sorted({1, min(count, 8)})
    if max(ns) > count:
        raise SystemExit(f"--gpus asks for {max(ns)} devices, {count} visible")
    seq = args.seq or p["seq"]
    calls = args.calls or p["decode_calls"]
    copy_bytes = (1 << 20) if args.tiny else (1 << 30)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not set(modes) <= {"tp", "dp"}:
        raise SystemExit(f"--modes takes tp and/or dp, got {args.modes!r}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or tmp
        os.makedirs(out, exist_ok=True)
        for job in _jobs(ns, modes, preset, seq, calls, args.steps, args.trials, out, copy_bytes, args.layers):
            # --tiny runs in this process (fast enough for CI); a real run isolates each configuration.
            r = run_one(job) if args.tiny else _spawn(job)
            with open(os.path.join(out, f"job_{job['mode']}{job['n']}.json"), "w") as f:
                json.dump(r, f)
        results = []
        for name in sorted(os.listdir(out), key=lambda x: (len(x), x)):
            if name.startswith("job_") and name.endswith(".json"):
                with open(os.path.join(out, name)) as f:
                    results.append(json.load(f))
        results = summarize(sorted(results, key=lambda r: (r["n"], r["mode"])), out)
    dev = next((r["device"] for r in results if "device" in r), "?")
    print(f"\n{datetime.date.today()} | {dev} x{max(ns)} | jax {jax.__version__} | {preset}, NF4+DQ, "
          f"QLoRA r={LORA_R} on {'/'.join(LORA_TARGETS)} adamw8bit seq {seq}\n")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
