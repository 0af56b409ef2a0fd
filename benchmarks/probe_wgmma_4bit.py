"""GPU probe of the Mosaic GPU 4-bit GEMM (``pallas_kernels.gemm_4bit_wgmma``): correctness against
the jnp reference, then kernel time (CUPTI, Mosaic GPU's profiler) against XLA's bf16 dot and the
Triton path of ``ops.matmul_4bit`` (wgmma dispatch off), and the whole op with the wgmma dispatch on
(x permutation and scales included), same process. All times are the sum of the GPU kernels of one
call (so XLA's small preparation kernels count; host dispatch does not). K=4096, N=14336, NF4 + double quant, bf16 x.

    PYTHONPATH=. python3 benchmarks/probe_wgmma_4bit.py --ms 16,128,4096
"""

import jax
import jax.numpy as jnp

from lowbit_jax import ops, quant
from pallas_kernels import _4bit_common as c4
from pallas_kernels import gemm_4bit_wgmma as gw


try:
    from benchmarks._timing import cupti_kernel_us as kernel_us
    from benchmarks._timing import probe_shape_args
except ImportError:  # run from benchmarks/
    from _timing import cupti_kernel_us as kernel_us
    from _timing import probe_shape_args


def configs(m):
    """The byte-table decode ("lut", the default) against the byte-permute one, same launch otherwise."""
    if m <= 16:
        return [gw.Config(tile_n=16, tile_k=256, stages=4, decode="lut"),
                gw.Config(tile_n=16, tile_k=128, stages=6, decode="lut")]
    tn = min(m, 128)
    return [gw.Config(tile_n=tn, tile_k=128, stages=3, decode="lut"),
            gw.Config(tile_n=tn, tile_k=128, stages=4, decode="prmt")]


def op_us(x, q, wgmma: bool):
    """ops.matmul_4bit with the wgmma dispatch on or off (a fresh jit: dispatch happens at trace)."""
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    saved = kern.WGMMA_MAX_M
    kern.WGMMA_MAX_M = 1 << 30 if wgmma else 0
    try:
        return kernel_us(jax.jit(lambda x, q: ops.matmul_4bit(x, q)), x, q)
    finally:
        kern.WGMMA_MAX_M = saved


def main():
    a = probe_shape_args()
    n, k = a.n, a.k
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32) * 0.02
    q = quant.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    del w
    wd = quant.dequantize_4bit(q, jnp.bfloat16)
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    codes, scales = jax.jit(kern.wgmma_operands, static_argnums=1)(q, jnp.bfloat16)
    for m in [int(s) for s in a.ms.split(",")]:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        ref = jnp.dot(x.astype(jnp.float32), wd.astype(jnp.float32).T)
        scale = float(jnp.max(jnp.abs(ref)))
        _, t_bf16 = kernel_us(jax.jit(lambda x, wd: jnp.dot(x, wd.T)), x, wd)
        y_cur, t_cur = op_us(x, q, wgmma=False)
        e_cur = float(jnp.max(jnp.abs(y_cur.astype(jnp.float32) - ref))) / scale
        y_op, t_op = op_us(x, q, wgmma=True)
        e_op = float(jnp.max(jnp.abs(y_op.astype(jnp.float32) - ref))) / scale
        print(f"M={m}: xla bf16 {t_bf16:.1f} us | Triton path {t_cur:.1f} us (err {e_cur:.1e}) | "
              f"ops.matmul_4bit with wgmma {t_op:.1f} us (err {e_op:.1e})", flush=True)
        xp = gw.permute_x(x)
        for cfg in configs(m):
            try:
                f = jax.jit(lambda c, s, xp, cfg=cfg: gw.matmul(c, s, xp, values=c4.NF4, cfg=cfg))
                yt, t = kernel_us(f, codes, scales, xp)
                err = float(jnp.max(jnp.abs(yt.astype(jnp.float32) - ref))) / scale
                print(f"M={m} {cfg}: {t:.1f} us = {t / t_bf16:.2f}x bf16, {t / t_cur:.2f}x Triton path; err {err:.1e}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                print(f"M={m} {cfg}: FAILED {type(e).__name__}: {str(e)[:3000]}", flush=True)


if __name__ == "__main__":
    main()
