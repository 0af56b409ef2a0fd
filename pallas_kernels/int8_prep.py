"""LLM.int8's preparation of a few rows of x in one kernel: outlier columns, int8 codes, outlier digits.

At decode sizes (M <= 16) the int8 GEMV reads a 59 MB weight in ~24 us, and the preparation of
x in XLA (column any, masked row absmax, codes, the two outlier digits, their stacking) is five
small fusions, ~15 us of kernels per call on an H100 (benchmarks/RESULTS.md, LLM.int8 profile):
in a model, where every layer has its own x, that is paid per layer. Here one program reads x
twice (row statistics, then the outputs), with every column's outlier test made from the whole
column it holds, so nothing goes through HBM in between.

Outputs, bit-identical to ``quant.int8_vectorwise_quant`` and ``int8_gemm.outlier_digits``
(same operations and roundings; round-half-even is PTX ``cvt.rni``, Triton having no round):

* ``stacked`` int8 [MP, 3K]: row i is ``[codes_i | d1_i | d2_i]``; its free reshape to
  [3 MP, K] orders the GEMM's rows (i, part), so the product's reshape to [MP, 3, N] splits
  the three accumulators without a copy;
* ``sx`` (the masked row absmax), ``s1``, ``s2`` fp32 [MP].

MP is M rounded up to a power of two (zero rows: zero codes and digits). Imports only jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

CHUNK = 256  # columns a loop step
NUM_WARPS = 4


def _rne(v, interpret: bool):
    """Round half to even (jnp.round). Pallas' Triton lowering has no round: PTX ``cvt.rni``.
    (The ``(v + 1.5 * 2^23) - 1.5 * 2^23`` identity is not safe: XLA folds it away on the CPU.)"""
    if interpret:
        return jnp.round(v)
    return pltriton.elementwise_inline_asm("cvt.rni.f32.f32 $0, $1;", args=[v], constraints="=f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])[0]


def _kernel(x_ref, out_ref, sx_ref, s1_ref, s2_ref, *, threshold, chunk, n_chunks, k, zero_cols, interpret):
    mp = x_ref.shape[0]
    thr = jnp.float32(threshold)

    def tile(c):
        x = x_ref[:, pl.ds(c * chunk, chunk)].astype(jnp.float32)
        a = jnp.abs(x)
        el = a >= thr  # bitsandbytes' per-element outlier test
        col = jnp.max(el.astype(jnp.int32), axis=0) > 0  # a column with any outlier
        return x, a, el, col

    def stats(c, carry):
        rmax, omax = carry
        _, a, el, col = tile(c)
        rmax = jnp.maximum(rmax, jnp.max(jnp.where(el, jnp.float32(0.0), a), axis=1))
        omax = jnp.maximum(omax, jnp.max(jnp.where(col[None, :], a, jnp.float32(0.0)), axis=1))
        return rmax, omax

    zeros = jnp.zeros((mp,), jnp.float32)
    rmax, omax = jax.lax.fori_loop(0, n_chunks, stats, (zeros, zeros))
    # as quant.int8_vectorwise_quant: 1/absmax rounded, then times 127 (two roundings)
    scale = (jnp.float32(1.0) / rmax) * jnp.float32(127.0)
    s1 = jnp.where(omax > 0, omax / jnp.float32(127.0), jnp.float32(1.0))
    s2 = s1 / jnp.float32(254.0)
    sx_ref[...] = rmax
    s1_ref[...] = s1
    s2_ref[...] = s2

    def write(c, carry):
        x, _, el, col = tile(c)
        x2 = jnp.where(el, jnp.float32(0.0), x)
        codes = jnp.where(rmax[:, None] > 0, _rne(x2 * scale[:, None], interpret), jnp.float32(0.0))
        if zero_cols:
            codes = jnp.where(col[None, :], jnp.float32(0.0), codes)
        xo = jnp.where(col[None, :], x, jnp.float32(0.0))
        d1 = jnp.clip(_rne(xo / s1[:, None], interpret), -127.0, 127.0)
        d2 = jnp.clip(_rne((xo - d1 * s1[:, None]) / s2[:, None], interpret), -127.0, 127.0)
        out_ref[:, pl.ds(c * chunk, chunk)] = codes.astype(jnp.int8)
        out_ref[:, pl.ds(k + c * chunk, chunk)] = d1.astype(jnp.int8)
        out_ref[:, pl.ds(2 * k + c * chunk, chunk)] = d2.astype(jnp.int8)
        return carry

    jax.lax.fori_loop(0, n_chunks, write, 0)


def rows_padded(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("threshold", "interpret", "chunk", "num_warps"))
def prepare(x, *, threshold: float, interpret: bool = False, chunk: int = CHUNK, num_warps: int = NUM_WARPS):
    """(stacked int8 [MP, 3K], sx, s1, s2 fp32 [MP]) for x [M, K] (16/32-bit), ``threshold`` > 0."""
    m, k = x.shape
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 for the outlier preparation, got {threshold}")
    mp = rows_padded(m)
    while chunk > 16 and k % chunk:
        chunk //= 2
    kp = -(-k // chunk) * chunk  # zero columns add nothing (and are sliced off)
    xp = jnp.pad(x, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else x
    kernel = functools.partial(_kernel, threshold=float(threshold), chunk=chunk, n_chunks=kp // chunk, k=kp,
                               zero_cols=m > 1, interpret=interpret)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    vec = jax.ShapeDtypeStruct((mp,), jnp.float32)
    params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    out, sx, s1, s2 = pl.pallas_call(
        kernel,
        grid=(1,),
        in_specs=[whole((mp, kp))],
        out_specs=[whole((mp, 3 * kp)), whole((mp,)), whole((mp,)), whole((mp,))],
        out_shape=[jax.ShapeDtypeStruct((mp, 3 * kp), jnp.int8), vec, vec, vec],
        compiler_params=params,
        interpret=interpret,
        name="int8_prep",
    )(xp)
    if kp != k:
        out = out.reshape(mp, 3, kp)[:, :, :k].reshape(mp, 3 * k)
    return out, sx, s1, s2


def stacked_product(x, codes_w, sw, *, threshold, bias=None, out_dtype=jnp.float32, interpret=False):
    """The small-M LLM.int8 product from :func:`prepare`: ONE XLA int8 dot of the 3 MP stacked
    rows against W, then ``acc0 * sx * sw / 127^2 + (acc1 * s1 + acc2 * s2) * sw / 127 + bias``
    (the arithmetic of ``int8_gemm.digits_reference``)."""
    from pallas_kernels import int8_gemm  # noqa: PLC0415 - sibling module, no cycle

    m, k = x.shape
    n = codes_w.shape[0]
    stacked, sx, s1, s2 = prepare(x, threshold=threshold, interpret=interpret)
    mp = stacked.shape[0]
    acc = jax.lax.dot_general(stacked.reshape(3 * mp, k), codes_w, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32).reshape(mp, 3, n)[:m]
    sw32 = sw.astype(jnp.float32)
    outl = (acc[:, 1].astype(jnp.float32) * s1[:m, None] + acc[:, 2].astype(jnp.float32) * s2[:m, None])
    extra = outl * (sw32[None, :] * jnp.float32(int8_gemm.INV_127))
    return int8_gemm.epilogue(acc[:, 0], sx[:m], sw, extra=extra, bias=bias, out_dtype=out_dtype)
