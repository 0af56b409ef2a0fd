"""Device time of a jitted JAX call, without the host's per-call dispatch and sync latency.

Timing one blocked call at a time (``t0; block_until_ready(f()); t1``) adds the dispatch and the
host-device round trip (~150-250 us for a small jit on an H100 box) to every sample: at 8 layers of
a 30 MB matmul that is most of the number. Here ``calls`` calls are queued back to back and the
clock is read once after the last one finishes, so the device never waits for the host as long
as one call's device work outlasts its dispatch; the result is the median over ``trials`` of the
mean per call.
"""

from __future__ import annotations

import time

import numpy as np


def device_time_s(f, *args, calls: int = 20, trials: int = 5) -> float:
    import jax

    jax.block_until_ready(f(*args))
    per_call = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return float(np.median(per_call))


def blocked_time_s(f, *args, reps: int = 20) -> float:
    """The older per-call method (dispatch included), kept to compare with anchors taken that way."""
    import jax

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def kernel_profile(f, *args, calls: int = 5) -> dict:
    """Every GPU kernel that ``calls`` calls of ``f`` launch (jax.profiler trace), per call:
    ``{"<stream>|<kernel>": {"per_call", "mean_us", "total_per_call_us"}}``, largest first, and
    ``<stream>|__span_per_call_us`` (first start to last end, over ``calls``) per stream."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    jax.block_until_ready(f(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
    pd = ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
    kernels: dict = {}
    for plane in pd.planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            starts, ends = [], []
            for ev in line.events:
                s = kernels.setdefault(f"{line.name[:24]}|{ev.name[:80]}", [0, 0.0])
                s[0] += 1
                s[1] += ev.duration_ns / 1e3
                starts.append(ev.start_ns)
                ends.append(ev.start_ns + ev.duration_ns)
            if starts:
                kernels[f"{line.name[:24]}|__span_per_call_us"] = [calls, (max(ends) - min(starts)) / 1e3]
    return {k: {"per_call": v[0] / calls, "mean_us": v[1] / max(v[0], 1), "total_per_call_us": v[1] / calls}
            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1][1])}


def print_profile(label: str, table: dict, top: int = 24) -> None:
    print(f"profile {label}: per call", flush=True)
    for k, v in list(table.items())[:top]:
        print(f"   {v['per_call']:5.1f} x {v['mean_us']:8.2f} us = {v['total_per_call_us']:8.2f}  {k}", flush=True)


def copy_bandwidth_tbps() -> float:
    """HBM copy bandwidth (read + write) of a 1 GiB elementwise pass: the ceiling the
    weight-streaming kernels are compared against in the same run. Queued calls
    (``device_time_s``): timing one blocked call at a time added the host round trip to each
    0.8 ms sample and read 2.1-2.6 TB/s on H100s that copy at ~2.9."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    return 2 * a.nbytes / device_time_s(f, a, calls=10) / 1e12


def chained_passes(mm):
    """jit of ``len(xs)`` passes of ``mm(x, w)`` over the layers; returns the last pass's
    outputs and a checksum that uses every product (so none is dead code).

    Each pass's x depends on the previous pass's outputs (times 0): XLA may not merge the
    passes' dots that share a weight into one (it does for independent ones, which reads each
    weight once for all passes)."""
    import jax
    import jax.numpy as jnp

    def f(xs, ws):
        outs, s = [], jnp.float32(0)
        for x in xs:
            x = x + (s * 0).astype(x.dtype)
            ys = [mm(x, w) for w in ws]
            s = s + sum(y[0, 0].astype(jnp.float32) for y in ys)
            outs += ys
        return tuple(outs[-len(ws):]), s
    return jax.jit(f)


def apply_config(gpu_config: dict, items) -> dict:
    """Set ``section.key=value`` overrides (``--config gemv.engine=mma``) in a GPU_CONFIG dict;
    values are parsed as Python literals where they can be. Returns the overrides applied."""
    import ast

    applied = {}
    for item in items or ():
        name, _, raw = item.partition("=")
        section, _, key = name.partition(".")
        if section not in gpu_config or not key or not raw:
            raise SystemExit(f"--config {item!r}: expected section.key=value with section in {sorted(gpu_config)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        gpu_config[section][key] = value
        applied[name] = value
    return applied


def cupti_kernel_us(f, *args) -> tuple:
    """(output, median microseconds of the GPU kernels of one call of ``f``) from Mosaic GPU's
    CUPTI profiler (10 calls). Kernel time only: no host dispatch, no gaps; a weight re-read
    every call may sit partly in L2, so weight-streaming kernels read a little fast here."""
    import statistics

    from jax.experimental.mosaic.gpu import profiler

    out, ms = profiler.measure(f, iterations=10)(*args)
    return out, 1e3 * statistics.median(ms)


def probe_shape_args():
    """--ms (rows of x, comma-separated), --n, --k of the GPU probes."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="16,128,4096")
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    return ap.parse_args()
