"""4-bit matmul on the GPU: lowbit-jax's Pallas kernels vs XLA bf16 vs bitsandbytes, side by side.

    PYTHONPATH=. python benchmarks/bench_matmul_4bit.py [--check] [--sweep] [--ms 1,16,128,1024,4096]

Device time per matmul: L=8 layers with distinct weights inside one jit returning all outputs
(torch: one CUDA graph), total / L, median of 20. ``% HBM`` is the weight bytes (packed +
absmax + nested) over the time, against a copy bandwidth measured in the same run.
``--check`` first compares the kernels with the jnp reference on the GPU (poisoned by fresh
random data; ragged shapes included). ``--sweep`` times launch configurations and prints
the best per workload. Results go to $OUT/bench_4bit.json (or /tmp).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import traceback

import numpy as np

try:
    from benchmarks._timing import device_time_s
except ImportError:  # run as a script from benchmarks/
    from _timing import device_time_s

OUT = os.environ.get("OUT", "/tmp")
L = 8
K = int(os.environ.get("BENCH_K", 4096))
R: dict = {}


def save():
    with open(os.path.join(OUT, "bench_4bit.json.tmp"), "w") as f:
        json.dump(R, f, indent=1)
    os.replace(os.path.join(OUT, "bench_4bit.json.tmp"), os.path.join(OUT, "bench_4bit.json"))


def jax_time(f, *args, reps=20):
    """Per-matmul device time in us: queued calls of the L-layer jit, total / calls / L."""
    return device_time_s(f, *args, calls=reps) * 1e6 / L


def copy_bandwidth():
    import jax
    import jax.numpy as jnp

    a = jnp.ones((256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a * 2.0)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return 2 * a.nbytes / float(np.min(ts)) / 1e12  # TB/s, read + write


def weights(n, k, quant_type="nf4", dq=True, seed=0):
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant

    out = []
    for i in range(L):
        w = jax.random.normal(jax.random.PRNGKey(seed + i), (n, k), jnp.float32) * 0.02
        out.append((quant.quantize_4bit(w, 64, quant_type, compress_statistics=dq), w.astype(jnp.bfloat16)))
    return out


def qbytes(q):
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (q.packed, q.absmax, q.nested_absmax) if a is not None)


def check():
    """Kernels vs the jnp reference on the GPU, forward and grad."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant
    from lowbit_jax.ops import matmul_4bit

    rng = np.random.default_rng(1)
    res = {}
    cases = [(1, 4096, 4096, "nf4", True, "bfloat16"), (16, 4096, 14336, "nf4", True, "bfloat16"),
             (128, 4096, 4096, "fp4", False, "float16"), (3, 4160, 100, "nf4", True, "float32"),
             (17, 4160, 100, "fp4", True, "bfloat16"), (1024, 4096, 4096, "nf4", True, "bfloat16")]
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    base = {key: dict(val) for key, val in kern.GPU_CONFIG.items()}
    for (m, k, n, qt, dq, dt), decode in itertools.product(cases, ("select", "prmt")):
        key = f"M{m}_K{k}_N{n}_{qt}_dq{int(dq)}_{dt}_{decode}"
        kern.GPU_CONFIG = {sec: dict(val, decode=decode) for sec, val in base.items()}
        try:
            w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
            q = quant.quantize_4bit(w, 64, qt, compress_statistics=dq)
            x = jnp.asarray(rng.standard_normal((m, k)), dt)
            yr = jax.jit(lambda x, q: matmul_4bit(x, q, impl="reference"))(x, q).astype(jnp.float32)
            yk = jax.jit(lambda x, q: matmul_4bit(x, q, impl="pallas"))(x, q).astype(jnp.float32)
            g = lambda impl: jax.jit(jax.grad(lambda x: jnp.sum(matmul_4bit(x, q, impl=impl).astype(jnp.float32) * yr)))(x)
            gr, gk = g("reference").astype(jnp.float32), g("pallas").astype(jnp.float32)
            res[key] = dict(fwd_rel=float(jnp.max(jnp.abs(yr - yk)) / jnp.max(jnp.abs(yr))),
                            grad_rel=float(jnp.max(jnp.abs(gr - gk)) / jnp.max(jnp.abs(gr))),
                            finite=bool(jnp.all(jnp.isfinite(yk))))
        except Exception as e:  # noqa: BLE001 - a failing case is reported, the run goes on
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print("check", key, res[key], flush=True)
    kern.GPU_CONFIG = base
    return res


def lowbit_fn():
    import jax

    from lowbit_jax.ops import matmul_4bit

    return jax.jit(lambda x, qs: tuple(matmul_4bit(x, q) for q in qs))


def bench_jax(ms, ns, bw):
    import jax
    import jax.numpy as jnp

    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    bf16 = jax.jit(lambda x, ws: tuple(x @ w.T for w in ws))
    res = {}
    for n in ns:
        wq = weights(n, K)
        qs, ws = [q for q, _ in wq], [w for _, w in wq]
        nbytes = qbytes(qs[0])
        for m in ms:
            x = jax.random.normal(jax.random.PRNGKey(99), (m, K), jnp.bfloat16)
            row = {}
            for name, fn, arg in [("xla_bf16", bf16, ws)]:
                row[name] = jax_time(fn, x, arg)
            saved = (kern.GEMV_MAX_M, kern.TILED_MIN_M)
            base = {key: dict(val) for key, val in kern.GPU_CONFIG.items()}
            for name, cross in [("lowbit", saved), ("lowbit_prmt", saved), ("lowbit_gemv", (1 << 30, 1 << 30)),
                                ("lowbit_gemm", (0, 1 << 30)), ("lowbit_tiled", (0, 0))]:
                if name == "lowbit_gemv" and m > 16 or name == "lowbit_gemm" and m > 1024 or name == "lowbit_tiled" and m < 128:
                    continue
                if name == "lowbit_prmt" and m >= saved[1]:
                    continue  # the tiled path decodes in XLA: no kernel decode to vary
                kern.GEMV_MAX_M, kern.TILED_MIN_M = cross
                if name == "lowbit_prmt":
                    kern.GPU_CONFIG = {sec: dict(val, decode="prmt") for sec, val in base.items()}
                try:
                    row[name] = jax_time(lowbit_fn(), x, qs)
                    if m >= 1024:  # scratch HBM of the 8-layer jit: shows whether W is expanded whole
                        mem = lowbit_fn().lower(x, qs).compile().memory_analysis()
                        row[name + "_temp_MB"] = getattr(mem, "temp_size_in_bytes", -1) / 1e6
                except Exception as e:  # noqa: BLE001
                    row[name] = f"ERR {type(e).__name__}: {str(e)[:300]}"
                finally:
                    kern.GEMV_MAX_M, kern.TILED_MIN_M = saved
                    kern.GPU_CONFIG = base
            if isinstance(row.get("lowbit"), float):
                row["lowbit_pct_hbm"] = 100 * nbytes / (row["lowbit"] * 1e-6) / (bw * 1e12)
            row["weight_bytes"] = nbytes
            res[f"N{n}_M{m}"] = row
            print("bench", n, m, row, flush=True)
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


def sweep(budget_s=240):
    """Time launch configurations at N=14336: GEMV (M=1 fma, M=16 dot), GEMM (M=128, 4096),
    decode by select tree vs inline-PTX prmt, and the tiled decode + XLA dot path."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    t_end = time.time() + budget_s
    qs = [q for q, _ in weights(14336, K)]
    res = {}
    base = {k: dict(v) for k, v in kern.GPU_CONFIG.items()}
    plan = []
    for d in ("prmt", "select"):
        for bn, bh, sp in [(64, 128, 4), (64, 128, 8), (32, 128, 8), (128, 64, 8), (64, 256, 4), (32, 256, 8)]:
            plan.append((1, "gemv_fma", dict(block_n=bn, block_h=bh, splits=sp, decode=d, num_warps=4, num_stages=3)))
        for (bn, bh, sp), w in itertools.product([(64, 128, 4), (32, 256, 4), (64, 128, 8), (128, 128, 8)], [4, 8]):
            plan.append((16, "gemv_dot", dict(block_n=bn, block_h=bh, splits=sp, decode=d, num_warps=w, num_stages=3)))
        for bm, bn, bh, w, st in [(128, 64, 32, 4, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 64, 64, 4, 3)]:
            plan.append((128, "gemm", dict(block_m=bm, block_n=bn, block_h=bh, decode=d, num_warps=w, num_stages=st)))
    for bm, bn, bh, w, st in [(128, 64, 32, 4, 4), (128, 128, 32, 8, 4)]:
        plan.append((4096, "gemm", dict(block_m=bm, block_n=bn, block_h=bh, decode="prmt", num_warps=w, num_stages=st)))
    for m in (128, 1024, 4096):
        for rows in (2048, 4096):
            plan.append((m, "tiled", dict(tile_rows=rows)))
    for m, kind, cfg in plan:
        if time.time() > t_end:
            break
        x = jax.random.normal(jax.random.PRNGKey(7), (m, K), jnp.bfloat16)
        saved = (kern.GEMV_MAX_M, kern.TILED_MIN_M, kern.TILE_ROWS)
        if kind == "tiled":
            kern.TILED_MIN_M, kern.TILE_ROWS = 0, cfg["tile_rows"]
        else:
            kern.GPU_CONFIG[kind] = cfg
            kern.GEMV_MAX_M = 16 if kind.startswith("gemv") else 0
        key = f"M{m}_{kind}_" + "_".join(f"{k}{v}" for k, v in cfg.items())
        try:
            res[key] = jax_time(lowbit_fn(), x, qs, reps=10)
        except Exception as e:  # noqa: BLE001
            res[key] = f"ERR {type(e).__name__}: {str(e)[:300]}"
        finally:
            kern.GPU_CONFIG = {k: dict(v) for k, v in base.items()}
            kern.GEMV_MAX_M, kern.TILED_MIN_M, kern.TILE_ROWS = saved
        print("sweep", key, res[key], flush=True)
    best = {}
    for key, v in res.items():
        if isinstance(v, float):
            m = key.split("_")[0]
            if m not in best or v < best[m][1]:
                best[m] = (key, v)
    res["best"] = best
    print("sweep best", best, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-seconds", type=float, default=240)
    ap.add_argument("--ms", default="1,16,128,1024,4096")
    ap.add_argument("--ns", default="4096,14336")
    ap.add_argument("--no-bnb", action="store_true")
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",")]
    ns = [int(v) for v in a.ns.split(",")]
    import jax

    R["env"] = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    R["copy_TBps"] = copy_bandwidth()
    print("copy bandwidth TB/s", R["copy_TBps"], flush=True)
    for name, fn in [("check", check if a.check else None), ("sweep", (lambda: sweep(a.sweep_seconds)) if a.sweep else None),
                     ("jax", lambda: bench_jax(ms, ns, R["copy_TBps"])),
                     ("bnb", None if a.no_bnb else (lambda: bench_bnb(ms, ns)))]:
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
    print("| N | M | lowbit-jax | prmt decode | gemv | gemm | tiled | XLA bf16 | bnb NF4 | lowbit/bf16 | lowbit/bnb | % HBM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, row in R.get("jax", {}).items():
        if not isinstance(row, dict):
            continue
        b = R.get("bnb", {}).get(key, {}) if isinstance(R.get("bnb"), dict) else {}
        n, m = key[1:].split("_M")
        f = lambda v: f"{v:.1f}" if isinstance(v, float) else ("-" if v is None else str(v)[:20])
        lb, bf, bn = row.get("lowbit"), row.get("xla_bf16"), b.get("bnb_nf4_dq")
        ratio = lambda a, c: f"{a / c:.2f}" if isinstance(a, float) and isinstance(c, float) else "-"
        print(f"| {n} | {m} | {f(lb)} | {f(row.get('lowbit_prmt'))} | {f(row.get('lowbit_gemv'))} | {f(row.get('lowbit_gemm'))} | {f(row.get('lowbit_tiled'))} | {f(bf)} | {f(bn)} | "
              f"{ratio(lb, bf)} | {ratio(lb, bn)} | {f(row.get('lowbit_pct_hbm'))} |")


if __name__ == "__main__":
    main()
