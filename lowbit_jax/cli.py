"""The ``lowbit-jax`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo_tensor_and_model() -> None:
    """Quantize one weight and a small MLP's weights; print footprints and round-trip errors."""
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant

    key = jax.random.key(0)
    w = jax.random.normal(key, (4096, 4096), jnp.float32) * 0.02
    rows = []
    for label, make in [
        ("bf16", lambda: w.astype(jnp.bfloat16)),
        ("nf4", lambda: quant.quantize_4bit(w, quant_type="nf4")),
        ("nf4+dq", lambda: quant.quantize_4bit(w, quant_type="nf4", compress_statistics=True)),
        ("fp4", lambda: quant.quantize_4bit(w, quant_type="fp4")),
        ("int8", lambda: quant.quantize_int8(w)),
    ]:
        t0 = time.perf_counter()
        q = jax.block_until_ready(make())
        dt = time.perf_counter() - t0
        back = quant.dequantize(q, jnp.float32)
        err = float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w))
        fp = quant.footprint(q)
        rows.append((label, fp.total_bytes, fp.bits_per_param, err, dt))
    print("One 4096x4096 weight, N(0, 0.02^2):")
    print(f"{'format':<8} {'bytes':>12} {'bits/param':>10} {'rel. error':>10} {'quantize s':>10}")
    for label, nbytes, bpp, err, dt in rows:
        print(f"{label:<8} {nbytes:>12,} {bpp:>10.3f} {err:>10.4f} {dt:>10.3f}")

    sizes = [(1024, 4096), (4096, 1024), (1024, 1024)]
    keys = jax.random.split(key, len(sizes))
    params = {f"layer{i}": jax.random.normal(k, s, jnp.float32) * 0.02 for i, (k, s) in enumerate(zip(keys, sizes))}
    qparams = {name: quant.quantize_4bit(p.T, compress_statistics=True) for name, p in params.items()}
    print("\nA 3-layer MLP's kernels, bf16 vs NF4 + double quant:")
    print(quant.footprint(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)).table())
    print(quant.footprint(qparams).table())


def cmd_demo(args) -> int:
    _demo_tensor_and_model()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="quantize a tensor and a model, print footprints and errors")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"lowbit-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
