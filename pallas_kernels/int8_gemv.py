"""Small-M LLM.int8 (decode, M <= 16) as ONE launch: int8 dots and the dequantizing epilogue.

Why a second int8 kernel: at M <= 16 the product is bound by reading the int8 weight once
(58.7 MB for 4096 x 14336: ~20 us on an H100). The split-K kernel in ``int8_gemm`` writes int32
partials that XLA sums and rescales afterwards, and XLA's own int8 GEMM over stacked rows writes
an int32 [N, rows] result that a separate epilogue kernel reads back (the profile's ~1 us a
layer). Here each program owns ``block_n`` rows of the weight and all of K: it streams its
weight rows once, multiplies them with x's codes (and, with outliers, x's one-digit outlier
rows from ``int8_gemm.fold_one_digit``) on the int8 tensor cores, and writes the final 16-bit
output; no int32 or fp32 [M, N] tensor reaches HBM.

Two int8 dots a weight tile (codes rows, digit rows) rather than one over the 32 rows stacked:
Triton cannot slice the stacked [block_n, 32] result, and splitting it with 0/1 fp32 dots cost
more than the second int8 dot (H100, M=16, threshold 6: 25.5 vs 24.7 us, RESULTS.md).

Orientation: the weight tile is the dot's left operand (``[block_n, K] x [K, M]``), so the
tensor-core tile's M side is the weight's rows and x's few rows take its narrow N side; the
[block_n, M] result is transposed in registers before the store.

Arithmetic is the same as ``int8_gemm.digits_reference`` (int32 dots, then
``acc * sx * sw / 127^2 + (acc_d * s1) * sw / 127 + bias`` in fp32, one cast). Imports only jax
(and int8_gemm's constants).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# bitsandbytes' dequantization constants, the zero padding and the operand checks of the GEMM
from pallas_kernels.int8_gemm import INV_127, INV_127_SQ, _pad, check_codes

ROWS = 16  # x's rows padded to the tensor-core tile's narrow side
# launch defaults: the measured best (H100 sweep, RESULTS.md "LLM.int8 v6"); ops passes GPU_CONFIG["gemv"]
BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 64, 256, 4, 3


def _kernel(w_ref, xc_ref, *rest, block_k, n_ktiles, has_digit, has_bias):
    rest = list(rest)
    xd_ref = rest.pop(0) if has_digit else None
    sx_ref = rest.pop(0)
    s1_ref = rest.pop(0) if has_digit else None
    sw_ref = rest.pop(0)
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    dims = (((1,), (1,)), ((), ()))

    def body(kb, carry):
        cols = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        ws = w_ref[:, cols]
        acc = carry[0] + jax.lax.dot_general(ws, xc_ref[:, cols], dims, preferred_element_type=jnp.int32)
        if not has_digit:
            return (acc,)
        return acc, carry[1] + jax.lax.dot_general(ws, xd_ref[:, cols], dims, preferred_element_type=jnp.int32)

    zero = jnp.zeros((w_ref.shape[0], xc_ref.shape[0]), jnp.int32)
    carry = jax.lax.fori_loop(0, n_ktiles, body, (zero, zero) if has_digit else (zero,))
    # the reference's epilogue on the [bn, ROWS] products, transposed into the [ROWS, bn] block
    sw = sw_ref[...]
    out = carry[0].astype(jnp.float32) * (sx_ref[...][None, :] * sw[:, None])
    out = out * jnp.float32(INV_127_SQ)
    if has_digit:
        out = out + (carry[1].astype(jnp.float32) * s1_ref[...][None, :]) * (sw[:, None] * jnp.float32(INV_127))
    if has_bias:
        out = out + bias_ref[...].astype(jnp.float32)[:, None]
    o_ref[...] = out.T.astype(o_ref.dtype)


def matmul(codes_x, sx, codes_w, sw, digit=None, bias=None, *, out_dtype=jnp.float32, block_n=BLOCK_N,
           block_k=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=False):
    """``codes_x @ codes_w.T * sx * sw / 127^2 [+ (d1 @ codes_w.T) * s1 * sw / 127] [+ bias]``.

    codes_x [M, K] int8 (M <= 16), sx [M] fp32 (x's row absmax, the codes' scale),
    codes_w [N, K] int8, sw [N] fp32 (bitsandbytes' ``CB`` / ``SCB``); ``digit`` =
    (d1 int8 [1, M, K], s1 fp32 [1, M]) from ``int8_gemm.fold_one_digit`` (x's outlier columns);
    bias [N]. Returns [M, N] ``out_dtype``. Any N and K: operands are zero-padded to the tiles
    (zero codes add nothing); real layer shapes (multiples of 256) need no weight copy.
    """
    m, k, n = check_codes(codes_x, codes_w)
    if m > ROWS:
        raise ValueError(f"codes_x may have at most {ROWS} rows here (the small-M kernel), got {m}")
    if sx.shape != (m,) or sw.shape != (n,):
        raise ValueError(f"sx must be [{m}] and sw [{n}], got {sx.shape} and {sw.shape}")
    block_k = min(block_k, max(32, 1 << (k - 1).bit_length()))
    xs = [_pad(_pad(codes_x, 0, ROWS), 1, block_k)]
    scales = [_pad(sx.astype(jnp.float32), 0, ROWS)]
    if digit is not None:
        d1, s1 = digit
        if d1.shape != (1, m, k) or d1.dtype != jnp.int8 or s1.shape != (1, m):
            raise ValueError(f"digit must be (int8 [1, {m}, {k}], fp32 [1, {m}]), got {d1.shape} {d1.dtype}, {s1.shape}")
        xs.append(_pad(_pad(d1[0], 0, ROWS), 1, block_k))
        scales.append(_pad(s1[0].astype(jnp.float32), 0, ROWS))
    wp = _pad(_pad(codes_w, 0, block_n), 1, block_k)
    np_, kp = wp.shape
    vec_spec = pl.BlockSpec((block_n,), lambda j: (j,))
    args = [wp, *xs, *scales, _pad(sw.astype(jnp.float32), 0, block_n)]
    in_specs = ([pl.BlockSpec((block_n, kp), lambda j: (j, 0))] + [pl.BlockSpec((ROWS, kp), lambda j: (0, 0))] * len(xs)
                + [pl.BlockSpec((ROWS,), lambda j: (0,))] * len(scales) + [vec_spec])
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {bias.shape}")
        args.append(_pad(bias, 0, block_n))
        in_specs.append(vec_spec)
    kernel = functools.partial(_kernel, block_k=block_k, n_ktiles=kp // block_k, has_digit=digit is not None,
                               has_bias=bias is not None)
    params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((ROWS, np_), jnp.dtype(out_dtype)),
        grid=(np_ // block_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((ROWS, block_n), lambda j: (0, j)),
        compiler_params=params,
        interpret=interpret,
    )(*args)
    return out[:m, :n]
