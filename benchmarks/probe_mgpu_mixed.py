"""Probe (GPU): is a Mosaic GPU mixed-type GEMM (weight as wgmma's register operand) a route to the
4-bit targets?  Times JAX's own int8 x bf16 Hopper kernel (``hopper_mixed_type_matmul_mgpu``) on our
shapes, weight [N, K] as the left operand, x.T [K, M] as the right one, against XLA's bf16 dot of
the same product, kernel time from CUPTI (Mosaic GPU's profiler), same process.

    PYTHONPATH=. python3 benchmarks/probe_mgpu_mixed.py --ms 16,128,4096
"""
import itertools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed


try:
    from benchmarks._timing import cupti_kernel_us as kernel_us
    from benchmarks._timing import probe_shape_args
except ImportError:  # run from benchmarks/
    from _timing import cupti_kernel_us as kernel_us
    from _timing import probe_shape_args


def main():
    a = probe_shape_args()
    n, k = a.n, a.k
    w = jax.random.randint(jax.random.key(0), (n, k), -127, 127, dtype=jnp.int8)
    wb = w.astype(jnp.bfloat16)
    for m in [int(s) for s in a.ms.split(",")]:
        xt = jax.random.normal(jax.random.key(1), (k, m), jnp.bfloat16)
        ref, t_bf16 = kernel_us(jax.jit(lambda wb, xt: jnp.dot(wb, xt, preferred_element_type=jnp.float32).astype(jnp.bfloat16)), wb, xt)
        print(f"M={m} xla_bf16 {t_bf16:.1f} us", flush=True)
        best = (None, 1e9)
        D = mixed.MatmulDimension
        if m <= 16:
            space = itertools.product((64, 128), (16,), (64, 128), (D.M,), (D.N,), (1,))
        elif m <= 128:
            space = itertools.product((64, 128), (64, 128), (64, 128), tuple(D), (D.N,), (1,))
        else:
            space = itertools.product((128,), (128, 256), (64, 128), tuple(D), (D.N,), (8,))
        for tm, tn, tk, wgd, gmd, gtw in space:
            cfg = mixed.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk, max_concurrent_steps=4,
                                     epi_tile_n=min(64, tn), epi_tile_m=64, grid_minor_dim=gmd,
                                     grid_tile_width=gtw, wg_dimension=wgd)
            try:
                out, t = kernel_us(jax.jit(lambda w, xt: mixed.mixed_matmul_kernel(w, xt, out_dtype=jnp.bfloat16, config=cfg)), w, xt)
            except Exception as e:  # configs that do not fit or do not divide
                print(f"M={m} cfg tm={tm} tn={tn} tk={tk} wg={wgd} minor={gmd} w={gtw}: skip {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))) / (float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) + 1e-9))
            print(f"M={m} cfg tm={tm} tn={tn} tk={tk} wg={wgd} minor={gmd} w={gtw}: {t:.1f} us ({t / t_bf16:.2f}x bf16) relerr {err:.1e}", flush=True)
            if t < best[1]:
                best = (cfg, t)
        print(f"M={m} best {best[1]:.1f} us = {best[1] / t_bf16:.2f}x xla bf16 {t_bf16:.1f}: {best[0]}", flush=True)


if __name__ == "__main__":
    main()
