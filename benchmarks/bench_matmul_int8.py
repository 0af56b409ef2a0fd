"""LLM.int8 matmul on the GPU: lowbit-jax (Pallas int8 kernel, XLA int8 dot) vs XLA bf16 vs bitsandbytes.

    PYTHONPATH=. python benchmarks/bench_matmul_int8.py [--check] [--sweep] [--ms 1,16,128,1024,4096]

Device time per matmul: L=8 layers with distinct weights inside one jit, 4 chained passes for
M <= 128 (see repeat_for; BENCH_PASSES overrides), returning the outputs
(torch: one CUDA graph, or, where bitsandbytes' outlier path syncs with the host and cannot be
captured, a CUDA-event-timed loop over the L layers, labelled as such), total / L, median of 20.
Inputs: bf16 x ~ N(0, 1) with 8 planted outlier feature columns scaled by 10 (|x| up to ~45,
so threshold 6 flags exactly those columns), W ~ N(0, 0.02^2) [N, K]. Beside each time: the
relative error ||y - y32|| / ||y32|| of layer 0 against an fp32 product with the original
(unquantized) weight. ``--check`` compares the Pallas path with the XLA path on ragged shapes
first. Results go to $OUT/bench_int8.json (or /tmp).
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
    from benchmarks._timing import chained_passes, copy_bandwidth_tbps, device_time_s, kernel_profile, print_profile
except ImportError:  # run as a script from benchmarks/
    from _timing import chained_passes, copy_bandwidth_tbps, device_time_s, kernel_profile, print_profile

OUT = os.environ.get("OUT", "/tmp")
L = 8
K = int(os.environ.get("BENCH_K", 4096))
N_OUTLIER_COLS = 8
R: dict = {}


def save():
    tmp = os.path.join(OUT, "bench_int8.json.tmp")
    with open(tmp, "w") as f:
        json.dump(R, f, indent=1)
    os.replace(tmp, os.path.join(OUT, "bench_int8.json"))


@contextlib.contextmanager
def attr(module, name, value):
    """``module.name = value`` for the ``with`` block (a dispatch switch of ``ops.matmul_int8``)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def jax_time(f, *args, reps=20, passes=1):
    """Per-matmul device time in us: queued calls of the jit (``passes`` passes over L layers),
    total / calls / (L * passes)."""
    return device_time_s(f, *args, calls=reps) * 1e6 / (L * passes)


def repeat_for(m):
    """Passes over the L layers inside one jit (as bench_matmul_4bit): with fast kernels one
    pass over 8 layers is shorter than the host's dispatch of a call, so the clock would time
    the host; 4 chained passes (fresh x per pass; 8 x 59 MB of weights cycle through the 50 MB
    L2, nothing cached) keep the GPU busy. Large M is device-bound at 1."""
    return int(os.environ.get("BENCH_PASSES", 4 if m <= 128 else 1))


def make_x(m, seed=99):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, K)).astype(np.float32)
    cols = np.sort(rng.choice(K, size=N_OUTLIER_COLS, replace=False))
    keep = np.ones(K, bool)
    keep[cols] = False
    x[:, keep] = np.clip(x[:, keep], -5.5, 5.5)  # only the planted columns may reach 6
    x[:, cols] *= 10.0
    return x, cols


def make_w(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, K)) * 0.02).astype(np.float32)


def rel_err(y, y32):
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(y - y32) / np.linalg.norm(y32))


def check():
    import jax
    import jax.numpy as jnp

    from lowbit_jax import ops, quant

    res = {}
    rng = np.random.default_rng(0)
    for m, k, n in [(1, 4096, 14336), (3, 200, 72), (16, 4096, 14336), (17, 1000, 300), (128, 4096, 4096), (1024, 4096, 14336)]:
        w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32))
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, rng.choice(k, 3, replace=False)] *= 10
        x = jnp.asarray(x, jnp.bfloat16)
        import importlib

        mi = importlib.import_module("lowbit_jax.ops.matmul_int8")
        if m > int(os.environ.get("CHECK_MAX_M", 1 << 30)):
            continue
        engines = ("xla", "pallas", "gemv") if m <= mi.SMALL_MAX_M else (mi.SMALL_ENGINE,)
        for (thr, cap), engine in [(tc, e) for tc in ((6.0, 64), (6.0, 2), (0.0, 64)) for e in engines]:
            # cap 2 < 3 planted columns: overflow path; small M: both engines
            key = f"M{m}_K{k}_N{n}_thr{thr:g}_cap{cap}" + (f"_{engine}" if m <= mi.SMALL_MAX_M else "")
            try:
                with attr(mi, "SMALL_ENGINE", engine):
                    out = jax.jit(lambda x: ops.matmul_int8(x, w8, thr, max_outliers=cap, impl="pallas"))(x)
                    ref = jax.jit(lambda x: ops.matmul_int8(x, w8, thr, impl="xla"))(x)
                d = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
                res[key] = {"max_abs_diff": d, "max_abs_ref": scale, "finite": bool(jnp.isfinite(out).all()),
                            "ok": bool(jnp.isfinite(out).all()) and d <= 2.0**-7 * scale}
            except Exception as e:  # noqa: BLE001
                res[key] = f"ERR {type(e).__name__}: {str(e)[:400]}"
            print("check", key, res[key], flush=True)
    return res


def sweep(budget_s):
    import jax
    import jax.numpy as jnp

    import importlib

    from lowbit_jax import ops, quant

    mi = importlib.import_module("lowbit_jax.ops.matmul_int8")  # the module, not the function

    t_end = time.time() + budget_s
    qs = [quant.quantize_int8(jnp.asarray(make_w(14336, i), jnp.bfloat16)) for i in range(L)]
    # (M, GPU_CONFIG section, config, threshold, max_outliers): the large-M kernel's tiles at
    # thr 0 and 6, then the cap of the outlier columns fused into its epilogue (the planted 8
    # columns fit 16; more than the cap go through the in-kernel overflow branch)
    plan = []
    large = lambda bm, bn, bk, w, st: dict(block_m=bm, block_n=bn, block_k=bk, splits=1, num_warps=w, num_stages=st)
    tiles = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 128, 8, 4),
             (128, 128, 256, 8, 3)]
    for thr, ts in ((0.0, tiles), (6.0, tiles[:3])):
        plan += [(4096, "large", large(*t), thr, mi.MAX_OUTLIERS) for t in ts]
    for m, cap in ((4096, 16), (4096, 32), (1024, 16), (1024, mi.MAX_OUTLIERS)):
        plan.append((m, "large", dict(mi.GPU_CONFIG["large"]), 6.0, cap))
    if os.environ.get("INT8_SWEEP") == "crossover":  # where the wide tiles start to pay
        plan = [(m, sec, large(*t), 6.0, mi.MAX_OUTLIERS) for m, sec in ((128, "medium"), (256, "medium"), (512, "large"))
                for t in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3))]
    if os.environ.get("INT8_SWEEP") == "orient":  # small M: operand order of XLA's int8 dot
        return _sweep_orient(mi, qs)
    if os.environ.get("INT8_SWEEP") == "gemv":  # small M: the one-launch kernel's tiles against XLA's dot
        return _sweep_gemv(mi, qs)
    if os.environ.get("INT8_SWEEP") == "digits":  # small M: two outlier digits (3M rows) or one (2M)
        return _sweep_small(mi, qs, "SMALL_DIGITS", (2, 1, 2, 1, 2, 1))
    base = {k: dict(v) for k, v in mi.GPU_CONFIG.items()}
    res = {}
    keys = []
    for m, kind, cfg, thr, cap in plan:
        if time.time() > t_end:
            break
        x = jnp.asarray(make_x(m)[0], jnp.bfloat16)
        key = f"M{m}_thr{thr:g}_cap{cap}_{kind}_" + "_".join(f"{k}{v}" for k, v in cfg.items())
        keys.append((key, m, kind, cfg, thr, cap))
        mi.GPU_CONFIG[kind] = cfg
        try:
            f = jax.jit(lambda x, qs, thr=thr, cap=cap: tuple(ops.matmul_int8(x, q, thr, max_outliers=cap, impl="pallas")
                                                              for q in qs))
            res[key] = jax_time(f, x, qs, reps=10)
        except Exception as e:  # noqa: BLE001
            res[key] = f"ERR {type(e).__name__}: {str(e)[:300]}"
        finally:
            mi.GPU_CONFIG = {k: dict(v) for k, v in base.items()}
        print("sweep", key, res[key], flush=True)
    best = {}
    for key, m, kind, cfg, thr, cap in keys:
        v = res.get(key)
        head = f"M{m}_thr{thr:g}"
        if isinstance(v, float) and (head not in best or v < best[head][1]):
            best[head] = (key, v)
    res["best"] = best
    print("sweep best", res["best"], flush=True)
    return res


def _sweep_orient(mi, qs):
    """Small M through XLA's int8 dot (mi.SMALL_ENGINE "xla"): x's rows or W's rows as the
    GEMM's M side, thresholds 6 (48 stacked rows) and 0 (16), 4 chained passes."""
    return _sweep_small(mi, qs, "SMALL_ORIENT", ("xw", "wx", "xw", "wx"))


def _small_xs(m):
    """The chained passes' inputs at M rows (one fresh x a pass)."""
    import jax.numpy as jnp

    return tuple(jnp.asarray(make_x(m, seed=99 + r)[0], jnp.bfloat16) for r in range(repeat_for(m)))


def _time_variant(res, key, m, thr, xs, qs, switches):
    """Append to ``res[key]`` the time of ``matmul_int8`` (threshold ``thr``, M rows) under the
    ``(module, name, value)`` switches, in a fresh jit (the switches act at trace time)."""
    from lowbit_jax import ops

    f = chained_passes(lambda x, q: ops.matmul_int8(x, q, thr, impl="pallas"))
    try:
        with contextlib.ExitStack() as stack:
            for module, name, value in switches:
                stack.enter_context(attr(module, name, value))
            res.setdefault(key, []).append(jax_time(f, xs, qs, passes=repeat_for(m)))
    except Exception as e:  # noqa: BLE001
        res[key] = f"ERR {type(e).__name__}: {str(e)[:300]}"
    print("sweep", key, res[key], flush=True)


def _sweep_gemv(mi, qs):
    """M=16 (thresholds 6 and 0), M=8, 4, 1 (6): SMALL_ENGINE "xla" (stacked rows, XLA's int8
    GEMM and a separate epilogue) against "gemv" (pallas_kernels.int8_gemv) under launch
    configs, and the outlier fold's search window; the xla baseline first and last (the
    run-to-run spread); 4 chained passes."""
    from pallas_kernels import int8_gemm

    g = lambda bn, bk, st: dict(block_n=bn, block_k=bk, num_warps=4, num_stages=st)
    best = g(64, 256, 3)
    runs16 = [("xla", None, None), ("gemv", best, None), ("gemv", g(32, 256, 3), None), ("gemv", g(64, 512, 4), None),
              ("gemv", best, 4), ("gemv", best, None), ("xla", None, None)]
    short = runs16[:2] + runs16[-1:]
    res = {}
    for m, thr, runs in ((16, 6.0, runs16), (16, 0.0, short), (8, 6.0, short), (4, 6.0, short), (1, 6.0, short)):
        xs = _small_xs(m)
        for engine, cfg, window in runs:
            key = (f"M{m}_thr{thr:g}_{engine}" + ("" if cfg is None else "_" + "_".join(f"{k}{v}" for k, v in cfg.items()))
                   + ("" if window is None else f"_window{window}"))
            switches = [(mi, "SMALL_ENGINE", engine), (mi, "GEMV_MIN_M", 1),
                        (mi, "GPU_CONFIG", dict(mi.GPU_CONFIG, gemv=cfg or mi.GPU_CONFIG["gemv"]))]
            if window is not None:
                switches.append((int8_gemm, "FOLD_WINDOW", window))
            _time_variant(res, key, m, thr, xs, qs, switches)
    return res


def _sweep_small(mi, qs, switch, values):
    """Small M (1, 16; thresholds 6 and 0) under each of ``values`` of ``mi.<switch>``, in the
    order given (repeat values, interleaved, to see the run-to-run spread); 4 chained passes."""
    res = {}
    for m in (1, 16):
        xs = _small_xs(m)
        for thr in (6.0, 0.0):
            for value in values:
                _time_variant(res, f"M{m}_thr{thr:g}_{switch}_{value}", m, thr, xs, qs, [(mi, switch, value)])
    return res


def bench_jax(ms, n, bw):
    import importlib

    import jax
    import jax.numpy as jnp

    from lowbit_jax import ops, quant

    w32 = [make_w(n, i) for i in range(L)]
    ws = [jnp.asarray(w, jnp.bfloat16) for w in w32]
    qs = [quant.quantize_int8(w) for w in ws]
    nbytes = qs[0].codes.size + 4 * qs[0].row_absmax.size
    bf16 = chained_passes(lambda x, w: x @ w.T)
    res = {}
    for m in ms:
        p = repeat_for(m)
        xfs = [make_x(m, seed=99 + r)[0] for r in range(p)]
        xs = tuple(jnp.asarray(xf, jnp.bfloat16) for xf in xfs)
        x = xs[0]
        # errors of layer 0 of the last pass (its x), against fp32 with the unquantized weight
        y32 = np.asarray(xfs[-1].astype(np.float32)).astype(np.float64) @ w32[0].T.astype(np.float64)
        row = {"xla_bf16": jax_time(bf16, xs, ws, passes=p), "passes": p,
               "xla_bf16_err": rel_err(bf16(xs, ws)[0][0].astype(jnp.float32), y32)}
        R.setdefault("gpu_config", {k: dict(v) for k, v in importlib.import_module("lowbit_jax.ops.matmul_int8").GPU_CONFIG.items()})
        for thr in (6.0, 0.0):
            mi = importlib.import_module("lowbit_jax.ops.matmul_int8")
            # "pallas" is what matmul_int8 runs on a GPU (small M: mi.SMALL_ENGINE decides);
            # "splitk" forces the Pallas split-K kernel for small M, so both engines are timed
            variants = [("pallas", "pallas", mi.SMALL_ENGINE), ("xla", "xla", mi.SMALL_ENGINE)]
            if m <= mi.SMALL_MAX_M:
                variants += [("splitk", "pallas", "pallas"), ("gemv", "pallas", "gemv")]
            for label, impl, engine in variants:
                name = f"lowbit_{label}_thr{thr:g}"
                f = chained_passes(lambda x, q, impl=impl, thr=thr: ops.matmul_int8(x, q, thr, impl=impl))
                try:
                    with attr(mi, "SMALL_ENGINE", engine), attr(mi, "GEMV_MIN_M", 1 if label == "gemv" else mi.GEMV_MIN_M):
                        row[name] = jax_time(f, xs, qs, passes=p)
                        row[name + "_err"] = rel_err(f(xs, qs)[0][0].astype(jnp.float32), y32)
                except Exception as e:  # noqa: BLE001
                    row[name] = f"ERR {type(e).__name__}: {str(e)[:300]}"
            _, _, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
            row["outlier_cols_found"] = int(np.asarray(mask).sum())
        if isinstance(row.get("lowbit_pallas_thr6"), float):
            row["pallas_thr6_pct_hbm"] = 100 * nbytes / (row["lowbit_pallas_thr6"] * 1e-6) / (bw * 1e12)
        res[f"M{m}"] = row
        print("bench", n, m, row, flush=True)
    return res


def errors_fp16(ms, n):
    """Relative error vs fp32 of the default path with fp16 x (bitsandbytes' input dtype in
    bench_bnb) beside bf16 x, on bench_bnb's inputs (bench_jax's errors use its last pass's x,
    a different sample for M <= 128), no timing."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import ops, quant

    w32 = make_w(n, 0)
    # W rounded to x's dtype before quantizing, as bench_jax (bf16) and bench_bnb (fp16) do
    qs = {dt: quant.quantize_int8(jnp.asarray(w32, dt)) for dt in ("float16", "bfloat16")}
    res = {}
    for m in ms:
        xf = make_x(m)[0]  # bench_bnb's x
        y32 = xf.astype(np.float64) @ w32.T.astype(np.float64)
        for thr in (6.0, 0.0):
            for dt in ("float16", "bfloat16"):
                f = jax.jit(lambda x, thr=thr, q=qs[dt]: ops.matmul_int8(x, q, thr))
                res[f"M{m}_thr{thr:g}_{dt}"] = rel_err(f(jnp.asarray(xf, dt)).astype(jnp.float32), y32)
        print("errors", m, {k: f"{v:.3e}" for k, v in res.items() if k.startswith(f"M{m}_")}, flush=True)
    return res


def bench_bnb(ms, n):
    import torch
    import bitsandbytes as bnb

    def graph_time(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run, how = g.replay, "graph"
        except Exception:  # noqa: BLE001 - outlier extraction syncs with the host: no capture
            torch.cuda.synchronize()
            run, how = fn, "loop"
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            run()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3 / L)
        return float(np.median(ts)), how

    res = {}
    w32 = [make_w(n, i) for i in range(L)]
    for thr in (6.0, 0.0):
        lins = []
        for w in w32:
            lin = bnb.nn.Linear8bitLt(K, n, bias=False, has_fp16_weights=False, threshold=thr)
            lin.weight = bnb.nn.Int8Params(torch.from_numpy(w).half(), requires_grad=False, has_fp16_weights=False)
            lins.append(lin.cuda().eval())
        for m in ms:
            xf, _ = make_x(m)
            x = torch.from_numpy(xf).half().cuda()
            y32 = xf.astype(np.float64) @ w32[0].T.astype(np.float64)
            with torch.no_grad():
                t, how = graph_time(lambda: [lin(x) for lin in lins])
                err = rel_err(lins[0](x).float().cpu().numpy(), y32)
            res.setdefault(f"M{m}", {})[f"bnb_thr{thr:g}"] = t
            res[f"M{m}"][f"bnb_thr{thr:g}_how"] = how
            res[f"M{m}"][f"bnb_thr{thr:g}_err"] = err
            print("bnb", thr, m, t, how, err, flush=True)
        del lins
        torch.cuda.empty_cache()
    return res


def table():
    jx, bb = R.get("jax", {}), R.get("bnb", {})
    print(f"\n==== per-matmul us (rel. err vs fp32), K={K}, N={R.get('N')}, L={L}, {R.get('env')}, copy {R.get('copy_TBps', 0):.2f} TB/s ====")
    print("| M | thr | lowbit (default) | lowbit XLA-int8 | lowbit split-K kernel | lowbit one-launch GEMV | XLA bf16 | bnb Linear8bitLt | default/bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(d, k):
        v = d.get(k)
        if not isinstance(v, float):
            return "n/a" if v is None else "ERR"
        e = d.get(k + "_err")
        return f"{v:.1f} ({e:.2e})" if isinstance(e, float) else f"{v:.1f}"

    for key, row in jx.items():
        if not isinstance(row, dict):
            continue
        for thr in ("6", "0"):
            b = bb.get(key, {}) if isinstance(bb, dict) else {}
            p = row.get(f"lowbit_pallas_thr{thr}")
            ratio = f"{p / row['xla_bf16']:.2f}" if isinstance(p, float) else "-"
            how = b.get(f"bnb_thr{thr}_how", "")
            print(f"| {key[1:]} | {thr} | {cell(row, f'lowbit_pallas_thr{thr}')} | {cell(row, f'lowbit_xla_thr{thr}')} | "
                  f"{cell(row, f'lowbit_splitk_thr{thr}')} | {cell(row, f'lowbit_gemv_thr{thr}')} | "
                  f"{cell(row, 'xla_bf16')} | {cell(b, f'bnb_thr{thr}')}{' ' + how if how else ''} | {ratio} |")


def profile(n, ms=(16,)):
    """Every GPU kernel of one 8-layer call at threshold 6 and 0 (where the outlier time goes)."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import ops, quant

    qs = [quant.quantize_int8(jnp.asarray(make_w(n, i))) for i in range(L)]
    res = {}
    for m, thr in [(m, t) for m in ms for t in (6.0, 0.0)]:
        x = jnp.asarray(make_x(m)[0], jnp.bfloat16)
        f = jax.jit(lambda x, qs, thr=thr: tuple(ops.matmul_int8(x, q, thr, impl="pallas") for q in qs))
        res[f"M{m}_thr{thr:g}"] = table = kernel_profile(f, x, qs)
        print_profile(f"int8 M={m} thr={thr:g} N={n} (8 layers)", table)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-ms", default="16")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-seconds", type=float, default=90)
    ap.add_argument("--ms", default="1,16,128,1024,4096")
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--errors-fp16", action="store_true", help="only the fp16/bf16-x errors of the default path")
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",") if v]
    import jax

    R["env"] = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    R["N"] = a.n
    R["copy_TBps"] = copy_bandwidth_tbps()
    print("copy bandwidth TB/s", R["copy_TBps"], flush=True)
    if a.errors_fp16:
        R["errors_fp16"] = errors_fp16(ms, a.n)
        save()
        return
    for name, fn in [("profile", (lambda: profile(a.n, [int(v) for v in a.profile_ms.split(",")])) if a.profile else None),
                     ("check", check if a.check else None),
                     ("sweep", (lambda: sweep(a.sweep_seconds)) if a.sweep else None),
                     ("jax", (lambda: bench_jax(ms, a.n, R["copy_TBps"])) if ms else None),
                     ("bnb", None if (a.no_bnb or not ms) else (lambda: bench_bnb(ms, a.n)))]:
        if fn is None:
            continue
        try:
            R[name] = fn()
        except Exception as e:  # noqa: BLE001
            R[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}", "tb": traceback.format_exc()[-1500:]}
            print(name, R[name], flush=True)
        save()
    table()


if __name__ == "__main__":
    main()
