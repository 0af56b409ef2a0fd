"""4-bit matmul on the GPU: lowbit-jax's Pallas kernels vs XLA bf16 vs bitsandbytes, side by side.

    PYTHONPATH=. python benchmarks/bench_matmul_4bit.py [--check] [--profile] [--sweep]
        [--ms 1,16,128,1024,4096] [--ns 4096,14336] [--no-bnb] [--ncu]

Device time per matmul: L=8 layers with distinct weights inside one jit, applied in P passes
(P=4 for M <= 128, each pass with its own x; see ``repeat_for``), total / (L * P)
(``benchmarks/_timing.py``: calls queued back to back, median of 5); torch: one CUDA graph of
the 8 layers, total / L. ``% HBM`` is the weight bytes (packed + absmax + nested) over the time, against a copy
bandwidth measured in the same run. ``--check`` first compares the kernels with the jnp
reference on the GPU (fresh random data; ragged shapes and every launch variant of the sweep's
GEMV included). ``--profile`` traces one 8-layer call per M with ``jax.profiler`` and lists every
GPU kernel it launched with its duration. ``--sweep`` times launch configurations. "previous path" in the table is the
dispatch before the row-sum GEMV and the band-decode kernel (M=1: split-K fma GEMV; large M:
bands decoded by XLA), timed in the same run. ``--ncu`` only runs a few kernels, for
``ncu -k regex:gemv`` to read their counters. Results go to $OUT/bench_4bit.json (or /tmp).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import traceback

import numpy as np

try:
    from benchmarks._timing import (apply_config, chained_passes, copy_bandwidth_tbps, device_time_s,
                                    kernel_profile, print_profile)
except ImportError:  # run as a script from benchmarks/
    from _timing import apply_config, chained_passes, copy_bandwidth_tbps, device_time_s, kernel_profile, print_profile

OUT = os.environ.get("OUT", "/tmp")
L = 8
K = int(os.environ.get("BENCH_K", 4096))
R: dict = {}


TAG = os.environ.get("BENCH_TAG", "")  # several processes of one device run write separate files


def save():
    path = os.path.join(OUT, f"bench_4bit{TAG}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(R, f, indent=1)
    os.replace(path + ".tmp", path)


def repeat_for(m):
    """Passes over the L layers inside one jit. With fast kernels one pass over 8 layers is
    shorter than the host's dispatch of a call (8 quantized pytrees, ~50 arrays: measured
    ~30 us a layer of idle GPU at M=1), so the queue drains and the clock times the host;
    4 passes (x differs per pass, so nothing is shared; 8 x 30 MB of weights cycle through
    the 50 MB L2, so nothing is cached) keep the GPU busy. Large M is device-bound at 1."""
    return int(os.environ.get("BENCH_PASSES", 4 if m <= 128 else 1))


def xs_for(m, seed=99):
    import jax
    import jax.numpy as jnp

    return tuple(jax.random.normal(jax.random.PRNGKey(seed + r), (m, K), jnp.bfloat16) for r in range(repeat_for(m)))


def jax_time(f, xs, *args, reps=20):
    """Per-matmul device time in us: queued calls of the jit (len(xs) passes over L layers),
    total / calls / (L * passes)."""
    return device_time_s(f, xs, *args, calls=reps) * 1e6 / (L * len(xs))


_WEIGHTS: dict = {}


def weights(n, k=None, quant_type="nf4", dq=True, seed=0):
    """L distinct quantized layers (and their bf16 originals), cached per shape."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant

    k = k or K
    key = (n, k, quant_type, dq, seed)
    if key not in _WEIGHTS:
        out = []
        for i in range(L):
            w = jax.random.normal(jax.random.PRNGKey(seed + i), (n, k), jnp.float32) * 0.02
            out.append((quant.quantize_4bit(w, 64, quant_type, compress_statistics=dq), w.astype(jnp.bfloat16)))
        _WEIGHTS.clear()  # one shape at a time on the device
        _WEIGHTS[key] = out
    return _WEIGHTS[key]


def qbytes(q):
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (q.packed, q.absmax, q.nested_absmax) if a is not None)


@contextlib.contextmanager
def variant(section=None, cfg=None, legacy=False, **attrs):
    """Temporarily change the dispatch: one GPU_CONFIG section, module attributes (crossovers,
    TILE_ROWS), or route 16-bit x to the older kernels (``legacy``: fma/dot split-K GEMV)."""
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    from pallas_kernels import _4bit_common as c4

    # "c4.NAME" attributes belong to pallas_kernels._4bit_common, the others to the dispatch
    where = lambda a: (c4, a[3:]) if a.startswith("c4.") else (kern, a)
    saved_cfg = {k: dict(v) for k, v in kern.GPU_CONFIG.items()}
    saved = {a: getattr(*where(a)) for a in list(attrs) + ["_half"]}
    try:
        if section is not None:
            kern.GPU_CONFIG[section] = dict(cfg)
        for a, v in attrs.items():
            setattr(*where(a), v)
        if legacy:
            kern._half = lambda dtype: False
        yield
    finally:
        kern.GPU_CONFIG = saved_cfg
        for a, v in saved.items():
            setattr(*where(a), v)


def check(variants):
    """Kernels vs the jnp reference on the GPU, forward and grad, fresh random data each case."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant
    from lowbit_jax.ops import matmul_4bit

    rng = np.random.default_rng(1)
    res = {}
    cases = [(1, 4096, 14336, "nf4", True, "bfloat16", True), (16, 4096, 14336, "nf4", True, "bfloat16", True),
             (3, 4160, 100, "fp4", True, "float16", True), (1, 4096, 4096, "fp4", False, "float16", False),
             (5, 4096, 4096, "nf4", True, "float32", False), (17, 4160, 100, "fp4", True, "bfloat16", True),
             (64, 4096, 4096, "nf4", True, "bfloat16", True), (40, 4096, 1024, "fp4", False, "float16", False),
             (128, 4096, 14336, "nf4", True, "bfloat16", False), (128, 4096, 4096, "fp4", False, "float16", False),
             (1024, 4096, 4096, "nf4", True, "bfloat16", True), (600, 4160, 300, "nf4", True, "float16", False),
             (512, 1024, 512, "nf4", True, "float32", False),
             # Hopper's wgmma GEMM: M=2 (16-row tile), M=300 (three 128-row tiles, padded)
             (2, 4096, 4096, "nf4", True, "bfloat16", True), (300, 4096, 4096, "fp4", True, "float16", False)]
    runs = [(c, None) for c in cases]
    # every launch variant the sweep will time (forward only; N=4096, one weight per M)
    for m, section, cfg, attrs in variants:
        if section is not None:
            runs.append(((m if m <= 128 else 1024, 4096, 4096, "nf4", True, "bfloat16", False), (section, cfg, attrs)))
    cache: dict = {}
    ref_fn = jax.jit(lambda x, q: matmul_4bit(x, q, impl="reference"))
    for (m, k, n, qt, dq, dt, grad), var in runs:
        key = f"M{m}_K{k}_N{n}_{qt}_dq{int(dq)}_{dt}" + ("" if var is None else f"_{var[0]}_" + "_".join(f"{a}{b}" for a, b in var[1].items()))
        try:
            ck = (m, k, n, qt, dq, dt)
            if var is None or ck not in cache:
                w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
                cache[ck] = quant.quantize_4bit(w, 64, qt, compress_statistics=dq)
            q = cache[ck]
            # fresh x every case: an output tile left unwritten would hold another case's values
            x = jnp.asarray(rng.standard_normal((m, k)), dt)
            yr = ref_fn(x, q).astype(jnp.float32)
            ctx = variant() if var is None else variant(var[0], var[1], **var[2])
            with ctx:
                yk = jax.jit(lambda x, q: matmul_4bit(x, q, impl="pallas"))(x, q).astype(jnp.float32)
                out = dict(fwd_rel=float(jnp.max(jnp.abs(yr - yk)) / jnp.max(jnp.abs(yr))),
                           finite=bool(jnp.all(jnp.isfinite(yk))))
                if grad:
                    g = lambda impl: jax.jit(jax.grad(lambda x: jnp.sum(matmul_4bit(x, q, impl=impl).astype(jnp.float32) * yr)))(x)
                    gr, gk = g("reference").astype(jnp.float32), g("pallas").astype(jnp.float32)
                    out["grad_rel"] = float(jnp.max(jnp.abs(gr - gk)) / jnp.max(jnp.abs(gr)))
            tol = 2e-4 if dt == "float32" else 1.5e-2
            out["ok"] = out["finite"] and out["fwd_rel"] < tol and out.get("grad_rel", 0) < tol
            res[key] = out
        except Exception as e:  # noqa: BLE001 - a failing case is reported, the run goes on
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}", "ok": False}
        print("check", key, res[key], flush=True)
    res["all_ok"] = all(v.get("ok") for v in res.values() if isinstance(v, dict))
    print("check all_ok", res["all_ok"], flush=True)
    return res


def lowbit_fn():
    from lowbit_jax.ops import matmul_4bit

    return chained_passes(matmul_4bit)


def profile(ms, n):
    """Every GPU kernel one 8-layer call launches, with its mean duration (jax.profiler)."""
    import jax
    import jax.numpy as jnp

    qs = [q for q, _ in weights(n)]
    res = {}
    for m in ms:
        runs = [("", {})] + ([("_legacy", dict(legacy=True))] if m == 1 else [])
        for suffix, kw in runs:
            with variant(**kw):
                table = kernel_profile(lowbit_fn(), xs_for(m, 5), qs)
            label = f"M{m}{suffix}"
            res[label] = table
            print_profile(f"{label} N={n} (8 layers)", table)
    return res


def bench_jax(ms, ns, bw):
    import jax
    import jax.numpy as jnp

    bf16 = chained_passes(lambda x, w: x @ w.T)
    res = {}
    for n in ns:
        wq = weights(n)
        qs, ws = [q for q, _ in wq], [w for _, w in wq]
        nbytes = qbytes(qs[0])
        for m in ms:
            x = xs_for(m)
            row = {"xla_bf16": jax_time(bf16, x, ws), "passes": len(x)}
            runs = [("lowbit", {})]
            if m == 1 or m >= 1024:  # M=1: the split-K fma GEMV; large M: bands decoded by XLA
                runs.append(("lowbit_legacy", dict(legacy=True)))
            if 128 <= m <= 1024:
                runs.append(("lowbit_gemm", dict(TILED_MIN_M=1 << 30)))
            if m >= 64:
                runs.append(("lowbit_tiled", dict(TILED_MIN_M=0)))
            for name, kw in runs:
                try:
                    with variant(**kw):
                        row[name] = jax_time(lowbit_fn(), x, qs)
                        if m >= 1024:  # scratch HBM of the 8-layer jit: shows whether W is expanded whole
                            mem = lowbit_fn().lower(x, qs).compile().memory_analysis()
                            row[name + "_temp_MB"] = getattr(mem, "temp_size_in_bytes", -1) / 1e6
                except Exception as e:  # noqa: BLE001
                    row[name] = f"ERR {type(e).__name__}: {str(e)[:300]}"
            if isinstance(row.get("lowbit"), float):
                row["lowbit_pct_hbm"] = 100 * nbytes / (row["lowbit"] * 1e-6) / (bw * 1e12)
            row["weight_bytes"] = nbytes
            res[f"N{n}_M{m}"] = row
            print("bench", n, m, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return res


def bench_bnb(ms, ns):
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    def graph_time(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3 / L)
        return float(np.median(ts))

    res = {}
    for n in ns:
        Ws = [torch.randn(n, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(L)]
        Q = [F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True) for W in Ws]
        for m in ms:
            x = torch.randn(m, K, dtype=torch.bfloat16, device="cuda")
            with torch.no_grad():
                res[f"N{n}_M{m}"] = {"bnb_nf4_dq": graph_time(lambda: [bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in Q]),
                                     "torch_bf16": graph_time(lambda: [x @ W.t() for W in Ws])}
            print("bnb", n, m, res[f"N{n}_M{m}"], flush=True)
        del Ws, Q
        torch.cuda.empty_cache()
    return res


def sweep_plan():
    """(M, GPU_CONFIG section or None, config, module attributes) to time at N=14336."""
    plan = []
    rows = lambda **kw: dict(dict(block_n=8, blocks_per_iter=16, splits=1, prefetch=True, num_warps=4,
                                  num_stages=1), **kw)
    row = dict(engine="rowsum", prefetch=True, num_stages=1)
    mma = dict(engine="mma", prefetch=False, num_stages=2)
    for kw in [row, mma, dict(mma, prefetch=True, num_stages=1), dict(mma, num_stages=3), dict(mma, block_n=16),
               dict(mma, blocks_per_iter=32)]:
        plan.append((1, "gemv", rows(**kw), {}))
    gemm = lambda **kw: dict(dict(block_m=128, block_n=128, block_h=64, decode="prmt", orient="wx", num_warps=8,
                                  num_stages=4), **kw)
    for kw in [{}, dict(orient="xw"), dict(num_warps=4)]:
        plan.append((128, "gemm", gemm(**kw), {}))
    return plan


def decode_plan():
    """M=1: the mma engine's decode (``_4bit_common.MMA_DECODE``: byte permutes in registers or
    the shared-memory byte table) at the default launch, interleaved three times each (the
    run-to-run spread), then the table decode at launch shapes around the default (fewer ALU
    instructions a weight may move the best launch)."""
    plan = [(1, None, {}, {"c4.MMA_DECODE": "prmt"})]
    base = dict(block_n=16, blocks_per_iter=16, splits=1, prefetch=False, num_warps=4, num_stages=2, engine="mma")
    for kw in [{}, dict(prefetch=True, num_stages=1), dict(blocks_per_iter=8), dict(blocks_per_iter=8, prefetch=True),
               dict(block_n=8, blocks_per_iter=32), dict(block_n=8, blocks_per_iter=32, prefetch=True),
               dict(blocks_per_iter=32), dict(block_n=16, blocks_per_iter=8, prefetch=True, num_stages=2), {}]:
        plan.append((1, "gemv", dict(base, **kw), {"c4.MMA_DECODE": "lut"}))
    return plan


def m16_plan():
    """M=16 (the split-K dot GEMV, ``gemv_dot``): splits, row tile, byte tile and warps around
    the default, which no earlier sweep covered at N=14336."""
    base = dict(block_n=64, block_h=128, splits=4, decode="prmt", num_warps=4, num_stages=3)
    kws = [{}, dict(splits=1), dict(splits=2), dict(splits=8), dict(block_n=32), dict(block_n=128),
           dict(block_h=64), dict(block_h=256), dict(num_warps=8), dict(num_stages=4), dict(splits=2, block_n=32), {}]
    return [(16, "gemv_dot", dict(base, **kw), {}) for kw in kws]


def lut_dot_plan():
    """M=16 (split-K dot GEMV) and M=128 (fused GEMM, forced past the band crossover): the
    prmt decode against the shared-memory byte table ("lut", scaled in the decode), then the
    table decode at a few launch shapes; the defaults repeated at the end (run-to-run spread)."""
    dot = dict(block_n=64, block_h=128, splits=4, decode="prmt", num_warps=4, num_stages=3)
    gemm = dict(block_m=128, block_n=128, block_h=64, decode="prmt", orient="wx", num_warps=8, num_stages=4)
    plan = [(16, "gemv_dot", dot, {}), (16, "gemv_dot", dict(dot, decode="lut"), {})]
    for kw in [dict(block_h=64), dict(splits=2), dict(splits=8), dict(num_warps=8), dict(block_n=128),
               dict(num_stages=2)]:
        plan.append((16, "gemv_dot", dict(dot, decode="lut", **kw), {}))
    plan += [(128, None, {}, {}), (128, "gemm", gemm, dict(TILED_MIN_M=10 ** 9)),
             (128, "gemm", dict(gemm, decode="lut"), dict(TILED_MIN_M=10 ** 9)),
             (128, "gemm", dict(gemm, decode="lut", block_h=128), dict(TILED_MIN_M=10 ** 9)),
             (16, "gemv_dot", dot, {}), (16, "gemv_dot", dict(dot, decode="lut"), {})]
    return plan


def lut_copies_plan():
    """M=1 (one-row GEMV) and M=64 (GEMM): the table's copies (``_4bit_common.LUT_COPIES``: 32
    conflict-free, 16 / 8 a smaller table and fill for some bank conflicts), interleaved twice;
    then the GEMV without Triton's pipelining (1 stage)."""
    gemm = dict(block_m=128, block_n=128, block_h=64, decode="lut", orient="wx", num_warps=8, num_stages=4)
    plan = [(1, None, {}, {"c4.LUT_COPIES": c}) for _ in range(2) for c in (32, 16, 8)]
    plan += [(64, "gemm", gemm, {"c4.LUT_COPIES": c, "TILED_MIN_M": 10 ** 9}) for c in (32, 8)]
    gemv = dict(block_n=16, blocks_per_iter=16, splits=1, prefetch=False, num_warps=4, num_stages=1, engine="mma")
    return plan + [(1, "gemv", gemv, {})]


def gemm128_plan():
    """M=128 with the byte-table GEMM (forced past the band crossover) at tile shapes the prmt
    sweeps did not cover: 112 programs of 128 x 128 leave 20 of 132 SMs idle."""
    gemm = dict(block_m=128, block_n=128, block_h=64, decode="lut", orient="wx", num_warps=8, num_stages=4)
    force = dict(TILED_MIN_M=10 ** 9)
    kws = [{}, dict(block_n=64), dict(block_n=64, num_warps=4), dict(block_n=64, num_stages=3),
           dict(block_h=128, num_stages=2), dict(orient="xw"), dict(block_n=64, block_h=128, num_stages=3)]
    return [(128, None, {}, {})] + [(128, "gemm", dict(gemm, **kw), force) for kw in kws] + [(128, None, {}, {})]


def lut_gemm_plan():
    """The fused GEMM (forced past the band crossover) at M=64 and M=128: prmt vs the byte-table
    decode, interleaved twice (the GEMM's run-to-run spread was 58-67 us at M=128)."""
    gemm = dict(block_m=128, block_n=128, block_h=64, decode="prmt", orient="wx", num_warps=8, num_stages=4)
    force = dict(TILED_MIN_M=10 ** 9)
    return [(m, "gemm", dict(gemm, decode=dec), force) for _ in range(2) for m in (64, 128) for dec in ("prmt", "lut")]


def bands_plan():
    """Large M: the band height (the scan assembly of the bands, 976 vs 820 us at M=4096, was
    removed after the 12:49 UTC run of this plan)."""
    return [(m, None, {}, dict(TILE_ROWS=rows)) for m in (4096, 1024) for rows in (7168, 4096, 2048)]


SMALL_N_PLAN = [  # N=4096: few output tiles, split-K matters
    (1, "gemv", dict(block_n=4, blocks_per_iter=16, splits=1, prefetch=False, num_warps=4, num_stages=1), {}),
    (1, "gemv", dict(block_n=8, blocks_per_iter=8, splits=4, prefetch=False, num_warps=4, num_stages=1), {}),
    (1, "gemv", dict(block_n=8, blocks_per_iter=16, splits=2, prefetch=False, num_warps=4, num_stages=1), {}),
    (16, "gemv_dot", dict(block_n=64, block_h=128, splits=8, decode="prmt", num_warps=8, num_stages=3), {}),
] + [(1, "gemv_narrow", dict(block_n=bn, blocks_per_iter=16, splits=s, prefetch=True, num_warps=4, num_stages=1,
                             engine=e), {})
     for e, bn, s in (("rowsum", 8, 2), ("mma", 8, 1), ("mma", 8, 2), ("mma", 4, 1))]


def sweep(plan, n, budget_s):
    import jax
    import jax.numpy as jnp

    t_end = time.time() + budget_s
    qs = [q for q, _ in weights(n)]
    res = R.setdefault(f"sweep_N{n}", {})  # saved after every variant: a cut-off run keeps its numbers
    for m, section, cfg, attrs in plan:
        if time.time() > t_end:
            print("sweep: out of time", flush=True)
            break
        x = xs_for(m, 7)
        key = f"N{n}_M{m}_{section or 'dispatch'}_" + "_".join(f"{k}{v}" for k, v in list(cfg.items()) + list(attrs.items()))
        base, rep = key, 2
        while key in res:  # a plan may repeat a variant (interleaved repeats): keep every timing
            key, rep = f"{base}_r{rep}", rep + 1
        res.setdefault("configs", {})[key] = [section, cfg, attrs]
        try:
            with variant(section, cfg, **attrs):
                res[key] = jax_time(lowbit_fn(), x, qs, reps=10)
                if "TILE_ROWS" in attrs:  # scratch HBM: one decoded band alive, or more?
                    mem = lowbit_fn().lower(x, qs).compile().memory_analysis()
                    res[key + "_temp_MB"] = getattr(mem, "temp_size_in_bytes", -1) / 1e6
        except Exception as e:  # noqa: BLE001
            res[key] = f"ERR {type(e).__name__}: {str(e)[:300]}"
        print("sweep", key, res[key] if not isinstance(res[key], float) else round(res[key], 2), flush=True)
        save()
    best = {}
    for key, v in res.items():
        if isinstance(v, float) and key != "configs" and not key.endswith("_temp_MB"):
            head = "_".join(key.split("_")[:2])
            if head not in best or v < best[head][1]:
                best[head] = (key, v)
    res["best"] = best
    print("sweep best", best, flush=True)
    return res


def ncu_targets():
    """Run the default GEMV (M=1, 16), the M=128 kernel and one band decode a few times each."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax.ops import matmul_4bit

    from lowbit_jax import quant

    w = jax.random.normal(jax.random.PRNGKey(0), (14336, K), jnp.float32) * 0.02
    q = quant.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    for m in (1, 16, 128, 1024):
        x = jax.random.normal(jax.random.PRNGKey(3), (m, K), jnp.bfloat16)
        jax.block_until_ready(jax.jit(lambda x: matmul_4bit(x, q))(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--check-variants", action="store_true", help="--check also runs every sweep variant")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-ms", default="1,16")
    ap.add_argument("--plan", default="launch", choices=("launch", "bands", "decode", "m16", "lut_dot", "lut_gemm", "lut_copies", "gemm128"),
                    help="--sweep plan: GEMV/GEMM launch shapes, the large-M band path, the one-row GEMV's "
                         "decode, the M=16 dot GEMV's launch, or the table decode (lut_dot, lut_gemm, lut_copies, gemm128)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-seconds", type=float, default=240)
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--ms", default="1,16,128,1024,4096")
    ap.add_argument("--ns", default="4096,14336")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--config", action="append", default=[],
                    help="GPU_CONFIG override section.key=value (repeatable), applied before every step")
    ap.add_argument("--apply-best", action="store_true",
                    help="after --sweep, run the benchmark with each section's best N=14336 config")
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",") if v]
    ns = [int(v) for v in a.ns.split(",") if v]
    import jax

    if a.ncu:
        ncu_targets()
        return
    R["env"] = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    R["config_overrides"] = apply_config(kern.GPU_CONFIG, a.config)
    if os.environ.get("BENCH_NO_WGMMA"):  # the Triton paths on Hopper too, to time them side by side
        kern.WGMMA_MAX_M = 0
        R["config_overrides"]["WGMMA_MAX_M"] = 0
    R["copy_TBps"] = copy_bandwidth_tbps()
    print("copy bandwidth TB/s", R["copy_TBps"], R["config_overrides"], flush=True)
    plan = {"launch": sweep_plan, "bands": bands_plan, "decode": decode_plan, "m16": m16_plan,
            "lut_dot": lut_dot_plan, "lut_gemm": lut_gemm_plan,
            "lut_copies": lut_copies_plan, "gemm128": gemm128_plan}[a.plan]()
    steps = [("check", (lambda: check(plan + SMALL_N_PLAN if a.check_variants else [])) if a.check else None),
             ("profile", (lambda: profile([int(v) for v in a.profile_ms.split(",")], 14336)) if a.profile else None),
             ("sweep_N14336", (lambda: sweep(plan, 14336, a.sweep_seconds)) if a.sweep else None),
             ("sweep_N4096", (lambda: sweep(SMALL_N_PLAN, 4096, 60)) if a.sweep and 4096 in ns else None),
             ("jax", (lambda: bench_jax(ms, ns, R["copy_TBps"])) if ms else None),
             ("bnb", None if (a.no_bnb or not ms) else (lambda: bench_bnb(ms, ns)))]
    for name, fn in steps:
        if name == "jax" and a.apply_best and isinstance(R.get("sweep_N14336"), dict):
            from lowbit_jax.ops import _matmul_4bit_kernels as kern

            sw = R["sweep_N14336"]
            for key, _ in (sw.get("best") or {}).values():
                section, cfg, attrs = sw["configs"][key]
                if section is not None and not attrs:
                    kern.GPU_CONFIG[section] = dict(cfg)
            R["applied_config"] = {k: dict(v) for k, v in kern.GPU_CONFIG.items()}
            print("applied", R["applied_config"], flush=True)
        if fn is None:
            continue
        try:
            R[name] = fn()
        except Exception as e:  # noqa: BLE001
            R[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}", "tb": traceback.format_exc()[-1500:]}
            print(name, R[name], flush=True)
        save()
    table()


def table():
    print(f"\n==== per-matmul us, K={K}, L={L}, {R['env']}, copy {R['copy_TBps']:.2f} TB/s ====")
    print("| N | M | lowbit-jax | previous path | GEMM | tiled | XLA bf16 | bnb NF4 | lowbit/bf16 | lowbit/bnb | % HBM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, row in (R.get("jax") or {}).items():
        if not isinstance(row, dict):
            continue
        b = R.get("bnb", {}).get(key, {}) if isinstance(R.get("bnb"), dict) else {}
        n, m = key[1:].split("_M")
        f = lambda v: f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v)[:20])
        lb, bf, bn = row.get("lowbit"), row.get("xla_bf16"), b.get("bnb_nf4_dq")
        ratio = lambda a, c: f"{a / c:.2f}" if isinstance(a, float) and isinstance(c, float) else "-"
        print(f"| {n} | {m} | {f(lb)} | {f(row.get('lowbit_legacy'))} | {f(row.get('lowbit_gemm'))} | {f(row.get('lowbit_tiled'))} | {f(bf)} | {f(bn)} | "
              f"{ratio(lb, bf)} | {ratio(lb, bn)} | {f(row.get('lowbit_pct_hbm'))} |")


if __name__ == "__main__":
    main()
