"""Peak GPU memory and tokens/s of one QLoRA training step, Llama-3-8B shape, batch 1, seq 2048.

Three contenders, each in its own process (so each peak is its own), same GPU, same run:

* ``jax-qlora``: lowbit-jax -- NF4 + double-quant frozen base generated directly in NF4 on the
  device (one layer's bf16 weight alive at a time, never the 8B model), LoRA r=16 on all seven
  linears of every layer, gradient checkpointing (remat of the scanned layer), bf16 compute,
  ``adamw8bit``.
* ``jax-bf16-lora``: the same step on a bf16 base with ``optax.adamw`` (the LoRA baseline).
* ``torch-qlora``: PyTorch + transformers + bitsandbytes + PEFT doing the same step as
  ``/work/shared/anchors/qlora_e2e_h100.py`` does (NF4+DQ, LoRA r=16 on all linears, gradient
  checkpointing, PagedAdamW8bit), where those packages import.

Method (the anchor's): weights random, tokens random, labels = inputs; 1 warm-up (compiling)
step, then ``--steps`` timed steps, each synchronised; the median step gives tokens/s = seq /
step. Peak memory is the allocator's peak since the process started (JAX: the device's
``peak_bytes_in_use`` with preallocation off; torch: ``max_memory_allocated`` after the model is
built), so it includes the weights, adapters, optimizer state and the step's transients. JAX
builds its weights one layer at a time and reports the peak reached before the first step too,
so a reader can see the step, not the set-up, set the peak.

    python benchmarks/bench_qlora_memory.py                       # all three, Llama-3-8B shape (GPU)
    python benchmarks/bench_qlora_memory.py --preset tiny         # a CPU smoke run of the same code
    python benchmarks/bench_qlora_memory.py --mode jax-qlora      # one contender, in this process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

PRESETS = {
    # Llama-3-8B: the anchor's LlamaConfig
    "llama3-8b": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, seq=2048,
                      rope_theta=500000.0),
    "tiny": dict(vocab=1024, hidden=256, inter=512, layers=2, heads=4, kv_heads=2, seq=128, rope_theta=10000.0),
}
MODES = ("jax-qlora", "jax-bf16-lora", "torch-qlora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ------------------------------------------------------------------------------------------------
# JAX (lowbit-jax)
# ------------------------------------------------------------------------------------------------


def _stacked_random(keys, shape, nf4: bool):
    """``[L, *shape]`` random weights, one layer drawn at a time inside ``lax.map``: NF4+DQ in
    bitsandbytes' ``[out, in]`` layout straight from each layer's bf16 draw, or bf16 ``[in, out]``."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant

    o, k = shape

    def one(kk):
        if nf4:
            w = jax.random.normal(kk, (o, k), jnp.bfloat16) * 0.02
            return quant.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return (jax.random.normal(kk, (k, o), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)

    return jax.lax.map(one, keys)


def _jax_params(cfg, nf4: bool, key):
    """Random decoder weights built on the device; the full-precision model never exists."""
    import jax
    import jax.numpy as jnp

    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out_in = {"q_proj": (qd, h), "k_proj": (kvd, h), "v_proj": (kvd, h), "o_proj": (h, qd),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    build = jax.jit(_stacked_random, static_argnums=(1, 2))  # one compile per distinct shape
    layers = {}
    for n, (name, shape) in enumerate(out_in.items()):
        keys = jax.random.split(jax.random.fold_in(key, n), L)
        layers[name] = {"kernel": jax.block_until_ready(build(keys, shape, nf4))}
    layers["input_norm"] = jnp.ones((L, h), jnp.bfloat16)
    layers["post_norm"] = jnp.ones((L, h), jnp.bfloat16)
    ke, kh = jax.random.split(jax.random.fold_in(key, 99))
    embed = jax.jit(lambda k: jax.random.normal(k, (cfg.vocab_size, h), jnp.bfloat16) * 0.02)(ke)
    # bitsandbytes/transformers keep the LM head in 16 bits (QuantConfig's skip_modules): so do we
    lm_head = jax.jit(lambda k: jax.random.normal(k, (h, cfg.vocab_size), jnp.bfloat16) * 0.02)(kh)
    return {"embed": embed, "layers": layers, "norm": jnp.ones((h,), jnp.bfloat16), "lm_head": {"kernel": lm_head}}


def run_jax(mode: str, p: dict, steps: int) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from lowbit_jax.finetune import adapters, training as train_mod
    from lowbit_jax.models.config import LlamaConfig
    from lowbit_jax.nn.lora import LoraConfig
    from lowbit_jax.optim import adamw8bit
    from lowbit_jax.quant import footprint

    dev = jax.local_devices()[0]

    def mem():
        s = dev.memory_stats() or {}
        return s.get("bytes_in_use"), s.get("peak_bytes_in_use")

    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      head_dim=p["hidden"] // p["heads"], rope_theta=p["rope_theta"], max_position_embeddings=8192,
                      rms_norm_eps=1e-5)
    nf4 = mode == "jax-qlora"
    t0 = time.perf_counter()
    params = _jax_params(cfg, nf4, jax.random.key(0))
    dropout = float(p.get("lora_dropout", 0.0))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS)
    params = adapters.add_adapters(params, lora, jax.random.key(1))
    weights_bytes = footprint({k: v for k, v in params.items()}).total_bytes
    opt = adamw8bit(2e-4) if nf4 else optax.adamw(2e-4)
    trainable, frozen, opt_state = train_mod.setup(params, opt)
    del params
    jax.block_until_ready((trainable, frozen, opt_state))
    build_s = time.perf_counter() - t0
    in_use_built, peak_built = mem()
    loss_fn = train_mod.make_loss(cfg, jnp.bfloat16, lora.scale, remat=True, lora_dropout=dropout)
    step = train_mod.make_step(loss_fn, opt)
    rng = np.random.default_rng(0)
    seq = p["seq"]
    ids = rng.integers(0, cfg.vocab_size, (1, seq + 1)).astype(np.int32)
    batch = {"tokens": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
             "mask": jnp.ones((1, seq), jnp.float32)}
    if dropout > 0:  # PEFT's lora_dropout: a fresh key every step, as finetune.train passes it
        batch["dropout_key"] = jax.random.key(7)
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    _, peak_compiled = mem()  # compiling (autotuning) may allocate scratch: reported apart from the step
    ma = compiled.memory_analysis()
    temp_bytes = getattr(ma, "temp_size_in_bytes", None) if ma is not None else None
    b0 = np.asarray(jax.device_get(trainable["layers"]["q_proj"]["lora_B"]))
    times, losses = [], []
    for i in range(steps + 1):
        if dropout > 0:
            batch = dict(batch, dropout_key=jax.random.fold_in(jax.random.key(7), i))
        t = time.perf_counter()
        trainable, opt_state, loss = compiled(trainable, opt_state, frozen, batch)
        loss = float(loss)
        times.append(time.perf_counter() - t)
        losses.append(loss)
    b1 = np.asarray(jax.device_get(trainable["layers"]["q_proj"]["lora_B"]))
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss: {losses}")
    if not np.any(b1 != b0):
        raise AssertionError("the adapters did not change: no gradient reached LoRA")
    in_use, peak = mem()
    st = _median(times[1:])
    return {"mode": mode, "device": dev.device_kind, "jax": jax.__version__, "seq": seq, "layers": cfg.num_hidden_layers,
            "build_s": build_s, "compile_s": compile_s, "first_step_s": times[0], "step_s_median": st,
            "step_s_all": times, "tokens_per_s": seq / st, "loss": losses, "lora_dropout": dropout,
            "weights_and_adapters_GB": weights_bytes / 1e9, "trainable_params": train_mod.count(trainable),
            "in_use_after_build_GB": _gb(in_use_built), "peak_after_build_GB": _gb(peak_built),
            "peak_before_step_GB": _gb(peak_compiled),
            "peak_GB": _gb(peak), "xla_temp_GB": _gb(temp_bytes)}


def _gb(x):
    return None if x is None else x / 1e9


# ------------------------------------------------------------------------------------------------
# PyTorch + transformers + bitsandbytes + PEFT (the anchor's step)
# ------------------------------------------------------------------------------------------------


def run_torch(p: dict, steps: int) -> dict:
    import torch

    versions = {"torch": torch.__version__}
    missing = []
    for name in ("bitsandbytes", "transformers", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - report whatever stops the import
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        return {"mode": "torch-qlora", "skipped": "not importable: " + "; ".join(missing), "versions": versions}
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = LlamaConfig(hidden_size=p["hidden"], intermediate_size=p["inter"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], num_hidden_layers=p["layers"], vocab_size=p["vocab"],
                      max_position_embeddings=8192, rope_theta=p["rope_theta"], tie_word_embeddings=False)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly (the anchor built fp32, then cast)
    with dev:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()

    def to_nf4(mod):  # every Linear but lm_head to NF4 + double quant, quantized where it lies
        for name, child in mod.named_children():
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True, device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, module=q).to(dev)
                setattr(mod, name, q)
                del child
            else:
                to_nf4(child)

    to_nf4(model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=list(TARGETS)))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = (bnb.optim.PagedAdamW8bit if cuda else bnb.optim.AdamW8bit)(params, lr=2e-4)
    seq = p["seq"]
    x = torch.randint(0, p["vocab"], (1, seq), device=dev)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    in_use_built = torch.cuda.memory_allocated() if cuda else None
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    st = _median(times[1:])
    return {"mode": "torch-qlora", "versions": versions, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "seq": seq, "layers": p["layers"], "build_s": build_s, "first_step_s": times[0], "step_s_median": st,
            "step_s_all": times, "tokens_per_s": seq / st, "loss": losses, "lora_dropout": dropout,
            "trainable_params": sum(q.numel() for q in params), "in_use_after_build_GB": _gb(in_use_built),
            "peak_GB": _gb(torch.cuda.max_memory_allocated()) if cuda else None,
            "optimizer": type(opt).__name__, "lora_dropout": 0.05}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def run_one(mode: str, p: dict, steps: int) -> dict:
    try:
        return run_torch(p, steps) if mode == "torch-qlora" else run_jax(mode, p, steps)
    except Exception as e:  # noqa: BLE001 - a failed contender is a result, not a crash
        return {"mode": mode, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def _table(results: list) -> str:
    rows = [f"{'contender':<16} {'tokens/s':>9} {'step s':>8} {'peak GB':>8} {'peak pre-step GB':>16} {'compile s':>9}  note"]
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append(f"{r['mode']:<16} {'-':>9} {'-':>8} {'-':>8} {'-':>16} {'-':>9}  {r.get('error') or r.get('skipped')}")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        rows.append(f"{r['mode']:<16} {r['tokens_per_s']:>9.0f} {r['step_s_median']:>8.3f} {f(r.get('peak_GB'), '.2f'):>8} "
                    f"{f(r.get('peak_before_step_GB'), '.2f'):>16} {f(r.get('compile_s'), '.1f'):>9}  "
                    f"loss {r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--mode", default="all", choices=("all",) + MODES)
    ap.add_argument("--modes", default=",".join(MODES), help="with --mode all: which contenders, in order")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up step")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per contender (subprocess)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for qlora_memory.json")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="the JAX contenders' LoRA dropout (the anchor's: 0.05)")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.layers:
        p["layers"] = args.layers
    if args.seq:
        p["seq"] = args.seq
    p["lora_dropout"] = args.lora_dropout
    if args.mode != "all":
        r = run_one(args.mode, p, args.steps)
        print("RESULT " + json.dumps(r), flush=True)
        return 0 if "error" not in r else 1
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--preset", args.preset, "--steps", str(args.steps)]
        cmd += ["--layers", str(p["layers"]), "--seq", str(p["seq"]), "--lora-dropout", str(p["lora_dropout"])]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", BITSANDBYTES_NOWELCOME="1")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"mode": mode, "error": f"no result (exit {proc.returncode})",
                                                         "stderr": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            r = {"mode": mode, "error": f"timed out after {args.timeout} s"}
        r["wall_s"] = time.perf_counter() - t0
        print(f"{mode}: {json.dumps({k: v for k, v in r.items() if k not in ('step_s_all', 'traceback', 'stderr')})}",
              flush=True)
        if "traceback" in r or "stderr" in r:
            print(r.get("traceback") or r.get("stderr"), file=sys.stderr, flush=True)
        results.append(r)
    print(f"\nQLoRA step, {args.preset} shape ({p['layers']} layers), batch 1, seq {p['seq']}, LoRA r=16 on all linears, "
          f"gradient checkpointing")
    print(_table(results))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "qlora_memory.json"), "w") as f:
            json.dump({"preset": args.preset, "shape": p, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
