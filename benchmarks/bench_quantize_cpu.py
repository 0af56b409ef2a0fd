"""Time the reference (pure jnp) quantizers on this machine's CPU: the load-time cost per weight.

    python benchmarks/bench_quantize_cpu.py [--out 4096] [--in 14336] [--repeats 3]

Prints first-call (compile + run) and warm times, and bitsandbytes' CPU time for the same
tensor when it is importable.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import quant


def _time(fn, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    return first, min(warm)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="in_f", type=int, default=14336)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    w = jax.random.normal(jax.random.key(0), (args.out, args.in_f), jnp.float32)
    cases = {
        "nf4": lambda: quant.quantize_4bit(w),
        "nf4+dq": lambda: quant.quantize_4bit(w, compress_statistics=True),
        "fp4": lambda: quant.quantize_4bit(w, quant_type="fp4"),
        "int8": lambda: quant.quantize_int8(w),
        "blockwise8 (256)": lambda: quant.quantize_blockwise(w, blocksize=256),
    }
    bnb = None
    try:
        import torch
        import bitsandbytes.functional as F

        wt = torch.from_numpy(np.array(w))
        bnb = {
            "nf4": lambda: F.quantize_4bit(wt, quant_type="nf4"),
            "nf4+dq": lambda: F.quantize_4bit(wt, quant_type="nf4", compress_statistics=True),
            "fp4": lambda: F.quantize_4bit(wt, quant_type="fp4"),
            "int8": lambda: F.int8_vectorwise_quant(wt.clone()),
            "blockwise8 (256)": lambda: F.quantize_blockwise(wt, blocksize=256),
        }
    except Exception:  # noqa: BLE001 - the peer is optional
        pass
    print(f"quantize a {args.out}x{args.in_f} fp32 weight on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'format':<18} {'first s':>9} {'warm s':>9} {'bnb s':>9}")
    for name, fn in cases.items():
        first, warm = _time(fn, args.repeats)
        peer = ""
        if bnb:
            t0 = time.perf_counter()
            bnb[name]()
            peer = f"{time.perf_counter() - t0:9.3f}"
        print(f"{name:<18} {first:9.3f} {warm:9.3f} {peer:>9}")


if __name__ == "__main__":
    main()
