"""Where a batch-1 decode step's time goes: the GPU kernels of ``llama.decode_step`` per token.

    PYTHONPATH=. python3 benchmarks/profile_decode.py [--preset llama3-8b] [--layers 4] [--calls 10]

Random NF4 + double-quant weights of the preset's shape (``bench_sharded.build_params`` on one
device; the LM head stays bf16), a cache holding ``prompt`` tokens, then ``calls`` one-token
steps, timed (queued steps, no host sync between them) twice: with the plain scan over sliced
layers and with the layer-indexed decode (``llama.LAYER_INDEXED_DECODE``), whose first-step
logits are compared. Then the indexed steps under the JAX profiler: every kernel's count and
time per token and the stream's span per token, so launch gaps and copies show beside the
matmuls. Results to ``$OUT/profile_decode.json`` (or /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import time

try:
    from benchmarks import bench_sharded as bs
    from benchmarks._timing import apply_config, kernel_profile, print_profile
except ImportError:  # run as a script from benchmarks/
    import bench_sharded as bs
    from _timing import apply_config, kernel_profile, print_profile


ROWSUM = dict(engine="rowsum", prefetch=True, num_stages=1)  # the fourth session's GEMV
DECODE_VARIANTS = [  # GPU_CONFIG overrides of "gemv" and "gemv_narrow", then the mma decode
    ({}, {}, "lut"), ({}, dict(blocks_per_iter=32), "lut"), ({}, dict(blocks_per_iter=64), "lut"),
    ({}, dict(blocks_per_iter=32, prefetch=False, num_stages=2), "lut"),
    ({}, dict(blocks_per_iter=64, prefetch=False, num_stages=1), "lut"), ({}, dict(block_n=4), "lut"),
    ({}, {}, "lut"),
]


def _sweep(params, cfg, context, tok, calls, res):
    """Decode ms a token for each DECODE_VARIANTS entry, in one process (same GPU, same weights)."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax.models import llama
    from lowbit_jax.ops import _matmul_4bit_kernels as kern
    from pallas_kernels import _4bit_common as c4

    base = {s: dict(kern.GPU_CONFIG[s]) for s in ("gemv", "gemv_narrow")}
    base_decode = c4.MMA_DECODE
    for over, over_narrow, decode in DECODE_VARIANTS:
        kern.GPU_CONFIG["gemv"] = dict(base["gemv"], **over)
        kern.GPU_CONFIG["gemv_narrow"] = dict(base["gemv_narrow"], **over_narrow)
        c4.MMA_DECODE = decode
        jax.clear_caches()
        cache = llama.init_cache(cfg, 1, context + 2 * calls + 4, jnp.bfloat16)
        pos = context
        for i in range(2):  # the second call compiles again (the cache comes back committed)
            logits, cache = llama.decode_step(params, tok, cache, pos + i, cfg, jnp.bfloat16)
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for i in range(calls):
            logits, cache = llama.decode_step(params, tok, cache, pos + 2 + i, cfg, jnp.bfloat16)
        jax.block_until_ready(logits)
        ms = (time.perf_counter() - t0) / calls * 1e3
        key = f"gemv {over or 'default'} narrow {over_narrow or 'default'} decode {decode}"
        res.setdefault("sweep", {})[key] = ms
        print(f"sweep {key}: {ms:.3f} ms a token", flush=True)
    kern.GPU_CONFIG.update({s: dict(v) for s, v in base.items()})
    c4.MMA_DECODE = base_decode
    jax.clear_caches()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(bs.PRESETS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--tp", action="store_true", help="decode through the tensor-parallel plan (a 1x1 mesh)")
    ap.add_argument("--sweep", action="store_true",
                    help="first time the decode step for each DECODE_VARIANTS entry (GEMV engine and "
                         "narrow-layer launch), same run")
    ap.add_argument("--config", action="append", default=[],
                    help="GPU_CONFIG override section.key=value (repeatable), e.g. gemv.engine=mma")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from lowbit_jax import sharding
    from lowbit_jax.models import llama

    p = dict(bs.PRESETS[args.preset], layers=args.layers)
    cfg = bs._config(p)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp"))
    tp = sharding.TensorParallel(mesh, sharding.LLAMA_TP_RULES + ((r"\['lm_head'\]", "out"),), "tp",
                                 batch_axis="dp")
    params = bs.build_params(cfg, tp, jax.random.key(0))
    context = p["prompt"]
    tok = jnp.asarray([[7]], jnp.int32)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
           "layers": args.layers, "tp": args.tp}
    if args.sweep:
        _sweep(params, cfg, context, tok, args.calls, res)
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    res["config_overrides"] = apply_config(kern.GPU_CONFIG, args.config)
    logits_by_mode = {}
    saved_mode = llama.LAYER_INDEXED_DECODE
    for indexed in (False, True):  # the plain scan over sliced layers, then the layer-indexed decode
        llama.LAYER_INDEXED_DECODE = indexed
        jax.clear_caches()
        # default: one device, no tensor-parallel plan (generate()'s path after load_pretrained());
        # --tp: through the plan's per-shard matmuls (load_pretrained(mesh=)'s path)
        plan = tp if args.tp else None
        cache = llama.init_cache(cfg, 1, context + 3 * args.calls + 4, jnp.bfloat16)
        if plan is not None:
            cache = jax.device_put(cache, plan.cache_sharding())
        state = {"cache": cache, "pos": context}

        def step():
            logits, state["cache"] = llama.decode_step(params, tok, state["cache"], state["pos"], cfg,
                                                       jnp.bfloat16, tp=plan)
            state["pos"] += 1
            return logits

        logits_by_mode[indexed] = np.asarray(jax.device_get(step()), np.float32)  # compile + first step
        jax.block_until_ready(step())
        t0 = time.perf_counter()
        for _ in range(args.calls):
            out = step()
        jax.block_until_ready(out)
        per_token = (time.perf_counter() - t0) / args.calls
        key = "indexed" if indexed else "scan_slices"
        res[f"step_ms_{key}"] = per_token * 1e3
        print(f"{args.preset} with {args.layers} layers on {res['device']}, {key}: {per_token * 1e3:.3f} ms a "
              f"token = {1 / per_token:.1f} tok/s", flush=True)
    llama.LAYER_INDEXED_DECODE = saved_mode  # the profile below runs the last (indexed) step
    diff = float(np.max(np.abs(logits_by_mode[True] - logits_by_mode[False])))
    res["max_abs_logit_diff"] = diff
    print(f"first-step logits, indexed vs scanned slices: max |diff| {diff:.3g} "
          f"(max |logit| {float(np.max(np.abs(logits_by_mode[False]))):.3g})", flush=True)
    table = kernel_profile(step, calls=args.calls)
    res["kernels"] = table
    print_profile(f"decode step, {args.layers} layers", table, top=40)
    out_dir = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out_dir, "profile_decode.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(out_dir, "profile_decode.json.tmp"), os.path.join(out_dir, "profile_decode.json"))


if __name__ == "__main__":
    main()
