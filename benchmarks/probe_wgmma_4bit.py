"""GPU probe of the Mosaic GPU 4-bit GEMM (``pallas_kernels.gemm_4bit_wgmma``): correctness against
the jnp reference, then kernel time (CUPTI, Mosaic GPU's profiler) against XLA's bf16 dot and the
current ``ops.matmul_4bit`` path, same process. K=4096, N=14336, NF4 + double quant, bf16 x.

    PYTHONPATH=. python3 benchmarks/probe_wgmma_4bit.py --ms 16,128,4096
"""
import argparse
import statistics
import traceback

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from lowbit_jax import ops, quant
from pallas_kernels import _4bit_common as c4
from pallas_kernels import gemm_4bit_wgmma as gw


def kernel_us(f, *args):
    out, ms = profiler.measure(f, iterations=10)(*args)
    return out, 1e3 * statistics.median(ms)


def operands(q, dtype):
    n, k = q.shape
    codes = jax.lax.bitcast_convert_type(q.packed.reshape(n, k // 8, 4), jnp.int32)
    scales_t = quant.absmax_4bit(q).reshape(n, k // 64).T.astype(dtype)
    return codes, scales_t


def configs(m):
    if m <= 16:
        return [gw.Config(tile_n=16, tile_k=tk, stages=s, kpar=kp) for kp in (1, 2) for tk in (128, 256)
                for s in (4, 8)]
    if m <= 128:
        return [gw.Config(tile_n=tn, tile_k=tk, stages=4) for tn in (m, 64) for tk in (128, 256) if m % tn == 0]
    return [gw.Config(tile_n=tn, tile_k=128, stages=s, grid_tile_width=w) for tn, s in ((128, 4), (256, 2))
            for w in (1, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="16,128,4096")
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    a = ap.parse_args()
    n, k = a.n, a.k
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 0.02
    q = quant.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    del w
    wd = quant.dequantize_4bit(q, jnp.bfloat16)
    codes, scales_t = jax.jit(operands, static_argnums=1)(q, jnp.bfloat16)
    for m in [int(s) for s in a.ms.split(",")]:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        ref = jnp.dot(x.astype(jnp.float32), wd.astype(jnp.float32).T)
        scale = float(jnp.max(jnp.abs(ref)))
        _, t_bf16 = kernel_us(jax.jit(lambda x, wd: jnp.dot(x, wd.T)), x, wd)
        y_cur, t_cur = kernel_us(jax.jit(ops.matmul_4bit), x, q)
        e_cur = float(jnp.max(jnp.abs(y_cur.astype(jnp.float32) - ref))) / scale
        print(f"M={m}: xla bf16 {t_bf16:.1f} us | current path {t_cur:.1f} us (err {e_cur:.1e})", flush=True)
        xp = gw.permute_x(x)
        for cfg in configs(m):
            try:
                f = jax.jit(lambda c, s, xp, cfg=cfg: gw.matmul(c, s, xp, values=c4.NF4, cfg=cfg))
                yt, t = kernel_us(f, codes, scales_t, xp)
                err = float(jnp.max(jnp.abs(yt.astype(jnp.float32) - ref))) / scale
                print(f"M={m} {cfg}: {t:.1f} us = {t / t_bf16:.2f}x bf16, {t / t_cur:.2f}x current; err {err:.1e}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                print(f"M={m} {cfg}: FAILED {type(e).__name__}: {str(e)[:3000]}", flush=True)
                pass
        # the whole op: x permutation + kernel
        cfg = configs(m)[0]
        full = jax.jit(lambda x, c, s: gw.matmul(c, s, gw.permute_x(x), values=c4.NF4, cfg=cfg))
        try:
            _, t_full = kernel_us(full, x, codes, scales_t)
            print(f"M={m} whole op (permute + kernel, {cfg}): {t_full:.1f} us", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"M={m} whole op FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
