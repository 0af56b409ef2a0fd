"""Optimizer step time and state bytes/param: lowbit-jax 8-bit AdamW vs optax and bitsandbytes.

268M fp32 parameters as 16 leaves of 4096x4096 (and bf16 parameters for the 8-bit variants).
Each JAX variant is one jitted step ``(params, state, grads) -> (params, state)`` with params and
state donated; ``STEPS`` steps run inside one jit (``lax.fori_loop``) and the time is total /
STEPS, so the call's host dispatch is divided by STEPS (``--profile`` shows the device time of
every kernel). The HBM copy bandwidth is measured in the same run. bitsandbytes runs eagerly (its
step is one kernel per tensor, 16 launches against ~9 ms), timed with CUDA events.

Correctness first: the fused kernel's parameters and state codes are compared with the jnp
reference after 3 steps on three leaves (one launch) before anything is timed.

Usage (GPU): PYTHONPATH=. python benchmarks/bench_optim.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import optax

from lowbit_jax.optim import adamw8bit, state_nbytes
from lowbit_jax.optim.fused import adam8bit_step_fused, adam8bit_step_grouped, adam_hyper

try:
    from benchmarks._timing import copy_bandwidth_tbps, kernel_profile, print_profile
except ImportError:  # run as a script from benchmarks/
    from _timing import copy_bandwidth_tbps, kernel_profile, print_profile

LEAVES, DIM = 16, 4096
INTERPRET = jax.default_backend() == "cpu"  # CPU smoke runs (--dim 512) use the kernel interpreter
# Steps inside one jitted call: the call's host dispatch (~0.1 ms with 16 leaves' 80 buffers) is
# divided by it. 10 steps added ~0.09 ms a step against 40 (H100, 16x4096: 1.709 vs 1.617 ms; the
# profiled kernel takes 1.575 ms a step): RESULTS.md.
STEPS = 40
REPEATS = 5


def _params(dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), LEAVES)
    return [jax.random.normal(k, (DIM, DIM), jnp.float32).astype(dtype) * 0.02 for k in keys]


def _time(fn, *args) -> float:
    """Seconds per call of ``fn`` (already compiled), best of REPEATS; returns args threaded."""
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = fn(*out[:2], *args[2:]) if isinstance(out, tuple) else fn(*args)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_optax(tx, dtype, name, results, grads_dtype=None):
    params = _params(dtype)
    grads = [g.astype(grads_dtype or dtype) for g in _params(jnp.float32, seed=1)]
    state = tx.init(params)
    nparams = sum(p.size for p in params)
    state_bytes = state_nbytes(state)
    device_bytes = sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(state)
        if getattr(getattr(x, "sharding", None), "memory_kind", "device") in ("device", None)
    )

    def loop(params, state, grads):
        def body(_, carry):
            p, s = carry
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, STEPS, body, (params, state))

    f = jax.jit(loop, donate_argnums=(0, 1))
    sec = _time(f, params, state, grads) / STEPS
    results[name] = {
        "step_ms": sec * 1e3,
        "state_bytes_per_param": state_bytes / nparams,
        "device_state_bytes_per_param": device_bytes / nparams,
        "params": nparams,
        "param_dtype": jnp.dtype(dtype).name,
    }
    print(f"{name:40s} {sec * 1e3:8.3f} ms  state {state_bytes / nparams:.4f} B/param"
          f"  on device {device_bytes / nparams:.4f} B/param", flush=True)
    del params, state, grads


def _donated_call_times(f, carry, *rest):
    """``f(*carry, *rest)`` with ``carry`` donated and threaded through REPEATS timed calls:
    (first call's seconds -- compile included --, best call's seconds, last carry)."""
    t0 = time.perf_counter()
    out = f(*carry, *rest)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = f(*out, *rest)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def bench_inplace(dtype, name, results, traffic_bytes_per_param, leaves_per_launch=None, profile=False,
                  **kernel_options):
    """The fused kernel writing p in place (no separate apply_updates pass), its leaves grouped
    into launches as ``adamw8bit_inplace`` does (``leaves_per_launch=1``: one launch a leaf)."""
    params = _params(dtype)
    grads = [g.astype(dtype) for g in _params(jnp.float32, seed=1)]
    tx = adamw8bit(1e-3, fused=True, interpret=INTERPRET)
    st = tx.init(params)
    mu, nu = st.mu, st.nu

    def loop(params, mu, nu, grads):
        def body(i, carry):
            p, m, v = carry
            hyper = adam_hyper(0.9, 0.999, 1e-8, 1e-3, 1e-2, i + 1)
            out = adam8bit_step_grouped([hyper] * len(p), p, grads, m, v, interpret=INTERPRET,
                                        leaves_per_launch=leaves_per_launch, **kernel_options)
            return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]

        return jax.lax.fori_loop(0, STEPS, body, (params, mu, nu))

    f = jax.jit(loop, donate_argnums=(0, 1, 2))
    first_s, best, out = _donated_call_times(f, (params, mu, nu), grads)
    sec = best / STEPS
    nparams = LEAVES * DIM * DIM
    results[name] = {
        "step_ms": sec * 1e3,
        "state_bytes_per_param": state_nbytes((out[1], out[2])) / nparams,
        "params": nparams,
        "param_dtype": jnp.dtype(dtype).name,
        "achieved_GBps": traffic_bytes_per_param * nparams / sec / 1e9,
        "first_call_s": first_s,
    }
    print(f"{name:40s} {sec * 1e3:8.3f} ms  state {results[name]['state_bytes_per_param']:.4f} B/param"
          f"  {results[name]['achieved_GBps']:.0f} GB/s  first call {first_s:.1f} s", flush=True)
    if profile:  # every kernel of one call (STEPS steps; not donated, so the entry copies show too)
        table = kernel_profile(jax.jit(loop), *out, grads, calls=1)
        results[name]["profile"] = table
        print_profile(f"{name} ({STEPS} steps)", table, top=12)


def check_fused(results):
    """The fused transformation against the jnp chain after 3 steps, leaf by leaf: a square leaf,
    two ragged ones of one signature (one launch, two branches) and a bf16 one."""
    key = jax.random.key(3)
    shapes = [((DIM, DIM), jnp.float32), ((1000, 300), jnp.float32), ((DIM // 2, 768), jnp.bfloat16),
              ((1000, 300), jnp.float32)]
    params = [(jax.random.normal(jax.random.fold_in(key, 10 + i), s, jnp.float32) * 0.02).astype(d)
              for i, (s, d) in enumerate(shapes)]
    ref, fus = adamw8bit(1e-3, fused=False), adamw8bit(1e-3, fused=True, interpret=INTERPRET)
    sr, sf = ref.init(params), fus.init(params)
    pr = pf = params
    for i in range(3):
        g = [jax.random.normal(jax.random.fold_in(key, i * 7 + j), p.shape, jnp.float32).astype(p.dtype)
             for j, p in enumerate(params)]
        u, sr = jax.jit(ref.update)(g, sr, pr)
        pr = optax.apply_updates(pr, u)
        u, sf = jax.jit(fus.update)(g, sf, pf)
        pf = optax.apply_updates(pf, u)
    for j, (s, d) in enumerate(shapes):
        dp = float(jnp.max(jnp.abs(pr[j].astype(jnp.float32) - pf[j].astype(jnp.float32))))
        dm = float(jnp.mean((sr[0].mu[j].codes != sf.mu[j].codes).astype(jnp.float32)))
        dv = float(jnp.mean((sr[0].nu[j].codes != sf.nu[j].codes).astype(jnp.float32)))
        name = "fused_vs_reference" + ("" if j == 0 else f" leaf {j} {s} {jnp.dtype(d).name}")
        results[name] = {"max_abs_param_diff": dp, "m_code_mismatch": dm, "v_code_mismatch": dv}
        print(f"fused vs reference after 3 steps, leaf {s} {jnp.dtype(d).name}: max|dp| {dp:.3g}, "
              f"code mismatch m {dm:.2e} v {dv:.2e}", flush=True)


def check_sharded(results):
    """``adamw8bit_inplace(shardings=...)`` on a mesh of every device (leading-axis split: the
    per-shard kernel inside shard_map) against the unsharded step: max |dp|, differing codes."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lowbit_jax.optim import adamw8bit_inplace

    mesh = Mesh(np.array(jax.devices()), ("data",))
    key = jax.random.key(5)
    params = [jax.random.normal(jax.random.fold_in(key, i), (DIM, DIM), jnp.float32) * 0.02 for i in range(3)]
    shardings = [NamedSharding(mesh, P("data"))] * 3
    opt_sh = adamw8bit_inplace(1e-3, interpret=INTERPRET, shardings=shardings)
    opt = adamw8bit_inplace(1e-3, interpret=INTERPRET)
    pa, sa = params, opt.init(params)
    pb, sb = jax.device_put(params, shardings), opt_sh.init(params)
    for i in range(3):
        g = [jax.random.normal(jax.random.fold_in(key, 10 + 3 * i + j), (DIM, DIM), jnp.float32) for j in range(3)]
        pa, sa = jax.jit(opt.step)(g, sa, pa)
        pb, sb = jax.jit(opt_sh.step)(jax.device_put(g, shardings), sb, pb)
    dp = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(pa, pb))
    dc = sum(int(jnp.sum(a.codes != b.codes)) for a, b in zip(sa.mu + sa.nu, sb.mu + sb.nu))
    results["sharded_vs_unsharded"] = {"devices": len(jax.devices()), "max_abs_param_diff": dp, "codes_differing": dc}
    print(f"sharded ({len(jax.devices())} devices, shard_map) vs unsharded after 3 steps: max|dp| {dp:.3g}, "
          f"codes differing {dc}", flush=True)


def time_sharded(results):
    """Step time of the in-place step with LEAVES x DIM^2 fp32 parameters split by rows over
    every device: ``shardings=`` (each device updates its shards) against the same sharded
    arrays without it (XLA gathers each leaf onto every device around the kernel)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lowbit_jax.optim import adamw8bit_inplace

    mesh = Mesh(np.array(jax.devices()), ("data",))
    shardings = [NamedSharding(mesh, P("data"))] * LEAVES
    for label, sh in (("per shard (shardings=)", shardings), ("gathered (no shardings)", None)):
        opt = adamw8bit_inplace(1e-3, interpret=INTERPRET, shardings=sh)
        params = jax.device_put(_params(jnp.float32), shardings)
        grads = jax.device_put(_params(jnp.float32, seed=1), shardings)
        state = opt.init(params)

        def loop(p, s, g):
            return jax.lax.fori_loop(0, STEPS, lambda i, c: opt.step(g, c[1], c[0]), (p, s))

        _, best, out = _donated_call_times(jax.jit(loop, donate_argnums=(0, 1)), (params, state), grads)
        ms = best / STEPS * 1e3
        results[f"sharded step {label}"] = {"step_ms": ms, "devices": len(jax.devices()), "params": LEAVES * DIM * DIM}
        print(f"sharded step over {len(jax.devices())} devices, {label}: {ms:.3f} ms", flush=True)
        del params, grads, state, out


def check_quantizers(results):
    """On the GPU: every rounding variant of the kernel gives the same codes and parameters."""
    from lowbit_jax.optim._state import zeros_state

    key = jax.random.key(4)
    p = jax.random.normal(key, (DIM, DIM), jnp.float32) * 0.02
    outs = {}
    for quantizer in ("lut", "segments", "bsearch", "segtable", "logtable"):
        mq, vq, pp = zeros_state(p, True, 4096), zeros_state(p, False, 4096), p
        step = jax.jit(lambda h, a, g, m, v: adam8bit_step_fused(h, a, g, m, v, interpret=INTERPRET,
                                                                  quantizer=quantizer))
        for i in range(3):
            g = jax.random.normal(jax.random.fold_in(key, i), (DIM, DIM), jnp.float32) * (10.0 ** -i)
            pp, mq, vq = step(adam_hyper(0.9, 0.999, 1e-8, 1e-3, 1e-2, i + 1), pp, g, mq, vq)
        outs[quantizer] = (pp, mq, vq)
    base = outs["lut"]
    for quantizer, (pp, mq, vq) in outs.items():
        rec = {
            "max_abs_param_diff_vs_lut": float(jnp.max(jnp.abs(pp - base[0]))),
            "m_codes_differing_vs_lut": int(jnp.sum(mq.codes != base[1].codes)),
            "v_codes_differing_vs_lut": int(jnp.sum(vq.codes != base[2].codes)),
        }
        results[f"quantizer check {quantizer}"] = rec
        print(f"quantizer {quantizer}: {rec}", flush=True)


def bench_bnb(results):
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as e:  # pragma: no cover - GPU image without the wheel
        print("bitsandbytes not importable:", e)
        return
    for name, cls in (("bnb AdamW8bit", bnb.optim.AdamW8bit), ("bnb PagedAdamW8bit", bnb.optim.PagedAdamW8bit)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(DIM, DIM, device="cuda", generator=gen) * 0.02) for _ in range(LEAVES)]
        for p in ps:
            p.grad = torch.randn(DIM, DIM, device="cuda", generator=gen)
        opt = cls(ps, lr=1e-3)
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(REPEATS):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(STEPS):
                opt.step()
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) / STEPS)
        nbytes = 0
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.is_cuda and v.numel() > 1:
                    nbytes += v.numel() * v.element_size()
        total = 0
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.numel() > 1:
                    total += v.numel() * v.element_size()
        nparams = LEAVES * DIM * DIM
        results[name] = {"step_ms": best, "state_bytes_per_param": total / nparams, "params": nparams}
        print(f"{name:40s} {best:8.3f} ms  state {total / nparams:.4f} B/param", flush=True)
        del opt, ps
        torch.cuda.empty_cache()


def sweep(results):
    """Kernel launch configurations, and what the two table gathers cost (diagnostic variants
    that skip a gather and so give wrong codes: timing only)."""
    from pallas_kernels import optim_8bit as K

    configs = [("lut", 32, 4), ("lut", 64, 4), ("lut", 32, 8)]
    configs += [("segments", r, w) for r in (4, 8, 16) for w in (2, 4, 8)]
    for quantizer, rows, warps in configs:
        name = f"sweep {quantizer} rows={rows} warps={warps}"
        _guard(lambda: bench_inplace(jnp.float32, name, results, 16, quantizer=quantizer, rows=rows,
                                     num_warps=warps))
    exact_req, exact_deq = K._requantize, K._dequantize

    def req_nogather(x, table_ref, quantizer, pieces=None, nonneg=False):
        idx, absmax = K._lut_index(x, nonneg)
        return (idx >> 8).astype(jnp.uint8), absmax

    def deq_nogather(codes, absmax, code_ref):
        return codes.astype(jnp.float32) * absmax[:, None]

    for label, req, deq in (("no gathers", req_nogather, deq_nogather),
                            ("map gathers only (no rounding read)", req_nogather, exact_deq),
                            ("rounding reads only (no map gather)", exact_req, deq_nogather)):
        K._requantize, K._dequantize = req, deq
        jax.clear_caches()
        for quantizer in ("lut", "segments") if req is exact_req else ("lut",):
            _guard(lambda: bench_inplace(jnp.float32, f"diagnostic {label} {quantizer}", results, 16,
                                         quantizer=quantizer))
    K._requantize, K._dequantize = exact_req, exact_deq
    jax.clear_caches()


KERNEL_VARIANTS = [  # (module switches of pallas_kernels.optim_8bit, rows, warps): the last sweep run
    (dict(UPDATE_ASM=False, CVT_ASM=False, CLIP=True), 8, 8), (dict(UPDATE_ASM=True, CVT_ASM=True, CLIP=True), 8, 8),
    (dict(UPDATE_ASM=True, CVT_ASM=True, CLIP=False), 8, 8), (dict(UPDATE_ASM=True, CVT_ASM=True, CLIP=False), 4, 8),
    (dict(UPDATE_ASM=False, CVT_ASM=False, CLIP=True), 8, 8), (dict(UPDATE_ASM=True, CVT_ASM=True, CLIP=True), 8, 8),
    (dict(UPDATE_ASM=True, CVT_ASM=True, CLIP=False), 8, 8), (dict(UPDATE_ASM=True, CVT_ASM=True, CLIP=False), 4, 8),
]


def sweep_kernel(ncu_only: bool):
    """Same-run timings of the fused kernel's code variants (their register counts decide the
    occupancy); with ``ncu_only`` one step each on one leaf, so ncu sees one launch a variant."""
    global LEAVES, STEPS, REPEATS
    from pallas_kernels import optim_8bit as K

    names = sorted({k for sw, _, _ in KERNEL_VARIANTS for k in sw})
    saved = {k: getattr(K, k) for k in names}
    if ncu_only:
        LEAVES, STEPS, REPEATS = 1, 1, 1
    res = {}
    for switches, rows, warps in KERNEL_VARIANTS:
        for k in names:
            setattr(K, k, switches.get(k, saved[k]))
        jax.clear_caches()
        name = "kernel " + " ".join(f"{k}={v}" for k, v in switches.items()) + f" rows={rows} warps={warps}"
        print("variant", name, flush=True)
        _guard(lambda: bench_inplace(jnp.float32, name, res, 16, rows=rows, num_warps=warps))
    for k, v in saved.items():
        setattr(K, k, v)
    jax.clear_caches()
    return res


def _guard(fn):
    """Run one measurement; a failing variant is reported and the others still run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports every variant it can
        print(f"FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)


def main():
    global DIM, LEAVES, STEPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--leaves", type=int, default=LEAVES)
    ap.add_argument("--sweep", action="store_true", help="also time kernel configurations and gather costs")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="first time the kernel's rounding variants (segments, segtable, logtable)")
    ap.add_argument("--sweep-launch", action="store_true",
                    help="only time rows x warps for the default rounding, then exit")
    ap.add_argument("--ncu", action="store_true", help="only run the in-place steps (for ncu -k regex:adam)")
    ap.add_argument("--sweep-kernel", action="store_true",
                    help="time the kernel's code variants (update order, zero-block fold, rows x warps)")
    ap.add_argument("--ncu-kernel", action="store_true",
                    help="one step of each --sweep-kernel variant on one leaf (ncu -k regex:adam: registers)")
    ap.add_argument("--quantizer", default=None, help="the kernel's rounding for every run (default: the module's)")
    ap.add_argument("--sweep-leaves", action="store_true",
                    help="only time the several-leaf launch's variants (leaf selection, rows), then exit")
    ap.add_argument("--check-sharded", action="store_true", help="only compare and time the sharded fused step, then exit")
    ap.add_argument("--profile", action="store_true", help="with --layouts: every kernel of one call")
    ap.add_argument("--leaves-per-launch", default=None, help="with --layouts: launch group sizes to time, e.g. 8,16")
    ap.add_argument("--steps", type=int, default=STEPS, help="steps inside one jitted call")
    ap.add_argument("--layouts", default=None,
                    help="only time the in-place step for these LEAVESxDIM layouts (e.g. 16x4096,1x16384), then exit")
    args = ap.parse_args()
    DIM, LEAVES, STEPS = args.dim, args.leaves, args.steps
    if args.quantizer:
        from pallas_kernels import optim_8bit as K

        K.QUANTIZER = args.quantizer
    if args.ncu:  # the leaves in one launch (--leaves 1 --dim 16384: one leaf of the same size)
        bench_inplace(jnp.float32, "ncu target", {}, 16)
        return
    if args.sweep_kernel or args.ncu_kernel:  # same-run A/B of the kernel's code variants
        _guard(lambda: sweep_kernel(args.ncu_kernel))
        return
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    bw = copy_bandwidth_tbps() * 1e12
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device {results['device']}, jax {jax.__version__}, HBM copy {bw / 1e9:.0f} GB/s", flush=True)
    if args.sweep_leaves:  # the several-leaf launch's variants, same run, one leaf as the reference
        from pallas_kernels import optim_8bit as K

        for select, rows, layout in [("tree", None, "16x4096"), ("switch", None, "16x4096"), ("tree", 8, "16x4096"),
                                     ("tree", None, "1x16384"), ("tree", None, "16x4096"),
                                     ("tree", None, "64x2048")]:
            K.LEAF_SELECT = select
            LEAVES, DIM = (int(v) for v in layout.split("x"))
            jax.clear_caches()
            _guard(lambda: bench_inplace(jnp.float32, f"leaves {layout} {select} rows={rows or K.MAX_ROWS}", results,
                                         16, rows=rows))
        _dump(results, args.out)
        return
    if args.check_sharded:
        _guard(lambda: check_sharded(results))
        _guard(lambda: time_sharded(results))
        _dump(results, args.out)
        return
    if args.layouts:  # same parameter count split into more or fewer leaves: what the launches cost
        _guard(lambda: check_fused(results))
        for spec in args.layouts.split(","):
            LEAVES, DIM = (int(v) for v in spec.split("x"))
            for lpl in [int(v) for v in args.leaves_per_launch.split(",")] if args.leaves_per_launch else [None]:
                label = f"layout {spec}" + (f" {lpl} a launch" if lpl else "")
                _guard(lambda: bench_inplace(jnp.float32, label, results, 16, leaves_per_launch=lpl,
                                             profile=args.profile))
            if LEAVES > 1 and not args.profile:
                _guard(lambda: bench_inplace(jnp.float32, f"layout {spec} one launch a leaf", results, 16,
                                             leaves_per_launch=1))
        _dump(results, args.out)
        return
    if args.sweep_launch:
        from pallas_kernels import optim_8bit as K

        for rows, warps in [(4, 8), (8, 8), (4, 4), (8, 4), (2, 2), (16, 8), (4, 8)]:
            name = f"launch {K.QUANTIZER} rows={rows} warps={warps}"
            _guard(lambda: bench_inplace(jnp.float32, name, results, 16, rows=rows, num_warps=warps))
        _dump(results, args.out)
        return
    if args.variants:  # time the rounding/update variants, then run everything with the fastest
        from pallas_kernels import optim_8bit as K

        timed = {}
        default_update = K.UPDATE
        plan = [(q, default_update) for q in ("segments", "segtable", "logtable")]
        plan += [("logtable", u) for u in ("one_div", "two_div") if u != default_update]
        plan.append(("logtable", default_update))  # again: the run-to-run spread
        for quantizer, update in plan:
            name = f"variant {quantizer} {update}"
            K.UPDATE = update
            jax.clear_caches()  # the update order is read at trace time
            _guard(lambda: bench_inplace(jnp.float32, name, results, 16, quantizer=quantizer))
            if name in results:
                timed[(quantizer, update)] = min(timed.get((quantizer, update), 1e9), results[name]["step_ms"])
        if timed:
            (K.QUANTIZER, K.UPDATE), best = min(timed.items(), key=lambda kv: kv[1])
            jax.clear_caches()
            results["applied_variant"] = {"quantizer": K.QUANTIZER, "update": K.UPDATE, "step_ms": best}
            print("applied", results["applied_variant"], flush=True)
    if args.sweep:
        _guard(lambda: check_quantizers(results))
        sweep(results)
        if args.sweep_only:
            _dump(results, args.out)
            return
    _guard(lambda: check_fused(results))
    _guard(lambda: check_sharded(results))
    _guard(lambda: check_quantizers(results))
    _guard(lambda: bench_inplace(jnp.float32, "lowbit adamw8bit fused in-place", results, 16))
    _guard(lambda: bench_inplace(jnp.float32, "lowbit adamw8bit fused in-place, one launch a leaf", results, 16,
                                 leaves_per_launch=1))
    _guard(lambda: bench_optax(adamw8bit(1e-3, fused=True, interpret=INTERPRET), jnp.float32, "lowbit adamw8bit fused (optax update+apply)", results))
    _guard(lambda: bench_optax(adamw8bit(1e-3, fused=False), jnp.float32, "lowbit adamw8bit reference (jnp chain)", results))
    _guard(lambda: bench_optax(optax.adamw(1e-3), jnp.float32, "optax.adamw fp32", results))
    _guard(lambda: bench_optax(adamw8bit(1e-3, fused=True, offload_state=True, interpret=INTERPRET),
                               jnp.float32, "lowbit adamw8bit fused offloaded", results))
    _guard(lambda: bench_inplace(jnp.bfloat16, "lowbit adamw8bit fused in-place bf16", results, 10))
    _guard(lambda: bench_optax(adamw8bit(1e-3, fused=False), jnp.bfloat16, "lowbit adamw8bit reference bf16", results))
    if not args.no_bnb:
        _guard(lambda: bench_bnb(results))
    _dump(results, args.out)


def _dump(results, path):
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
