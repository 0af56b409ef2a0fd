"""Dequantize a band of rows of a 4-bit (NF4/FP4) weight to a 16-bit dtype: one streaming pass.

The large-M path multiplies by a vendor GEMM, one band of output rows of W at a time (a few
thousand rows, never the whole weight): this kernel makes that band. It reads the canonical
bytes (``packed`` viewed as ``[N, K/blocksize, blocksize/2]``, so a tile's absmax is a plain
``[rows, blocks]`` tile broadcast over its last axis, no reshape), decodes both nibbles with
the inline-PTX byte permutes, scales in fp32 by the absmax (double quantization undone
in-kernel) and rounds once to the 16-bit dtype, as the jnp reference does. The two values of
a byte are adjacent in the output (element ``2j`` is the high nibble), so each pair is packed
into one 32-bit word (``cvt.rn.bf16x2.f32``, high nibble in the low half) and the band is
written as 32-bit words ``[rows, K/2]``: 16-byte stores, and a free bitcast to ``[rows, K]``.

The band's first row comes in as an array (the caller's scan index), so one compiled kernel
serves every band.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _4bit_common as c4

BLOCK_ROWS, BLOCKS = 32, 4
NUM_WARPS = 4


def _pack_pairs(hi, lo, dtype, interpret):
    """32-bit words holding (hi, lo) rounded to ``dtype``, hi in the low 16 bits, typed float32
    (Triton's inline asm returns floating-point or integer types only; the bits are what count)."""
    if interpret:
        h = jax.lax.bitcast_convert_type(hi.astype(dtype), jnp.uint16).astype(jnp.uint32)
        l_ = jax.lax.bitcast_convert_type(lo.astype(dtype), jnp.uint16).astype(jnp.uint32)
        return jax.lax.bitcast_convert_type(h | (l_ << 16), jnp.float32)
    cvt = "bf16x2" if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) else "f16x2"
    out = jax.ShapeDtypeStruct(hi.shape, jnp.float32)
    return pltriton.elementwise_inline_asm(f"cvt.rn.{cvt}.f32 $0, $1, $2;", args=[lo, hi],
                                           constraints="=r,r,r", pack=1, result_shape_dtypes=[out])[0]


def _body(start_ref, p_ref, a_ref, *rest, rows_per_prog, blocks_per_prog, values, nested,
          blocks_per_row, nested_blocksize, n_nested, dtype, interpret):
    rest = list(rest)
    if nested:
        ncode_ref, nabs_ref, off_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    (o_ref,) = rest
    r_local = pl.program_id(0) * rows_per_prog
    r0 = start_ref[0] + r_local
    b0 = pl.program_id(1) * blocks_per_prog
    rows, cols = pl.ds(r0, rows_per_prog), pl.ds(b0, blocks_per_prog)
    p = p_ref[rows, cols, :]  # [R, TB, hb] uint8
    a = a_ref[rows, cols]
    if nested:
        shape = (rows_per_prog, blocks_per_prog)
        flat = ((jax.lax.broadcasted_iota(jnp.int32, shape, 0) + r0) * blocks_per_row
                + jax.lax.broadcasted_iota(jnp.int32, shape, 1) + b0)
        nidx = jnp.minimum(flat // nested_blocksize, n_nested - 1)  # padded rows: clamp
        a = ncode_ref[a.astype(jnp.int32)] * nabs_ref[nidx] + off_ref[0]
    a = a.astype(jnp.float32)[:, :, None]
    hi, lo = c4.decode_nibbles(p, values, None, "prmt", interpret)
    o_ref[pl.ds(r_local, rows_per_prog), cols, :] = _pack_pairs(hi * a, lo * a, dtype, interpret)


def dequantize_rows(packed, absmax, start, *, rows, quant_type, blocksize, dtype,
                    nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256,
                    block_rows=BLOCK_ROWS, blocks=BLOCKS, num_warps=NUM_WARPS, interpret=False):
    """Rows ``[start, start + rows)`` of W in ``dtype`` (bf16/fp16), ``[rows, K]``.

    ``packed`` ``[N, K/2]`` uint8 and ``absmax`` ``[N, K/blocksize]`` (fp32, or uint8 codes with
    the nested arrays); ``start`` an int32 scalar array (traced: a scan index times rows).
    ``rows`` must be a multiple of ``block_rows``, K/blocksize of ``blocks``.
    """
    n, kh = packed.shape
    hb = blocksize // 2
    nblk = kh // hb
    if rows % block_rows or nblk % blocks:
        raise ValueError(f"untiled dequant: rows={rows}/{block_rows}, blocks={nblk}/{blocks}")
    packed3 = packed.reshape(n, nblk, hb)
    nested = nested_absmax is not None
    args = [jnp.reshape(start, (1,)).astype(jnp.int32), packed3, absmax]
    full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
    in_specs = [full((1,)), full(packed3.shape), full(absmax.shape)]
    if nested:
        args += [jnp.asarray(nested_code, jnp.float32), nested_absmax.astype(jnp.float32),
                 jnp.reshape(offset, (1,)).astype(jnp.float32)]
        in_specs += [full((256,)), full(nested_absmax.shape), full((1,))]
    kernel = functools.partial(
        _body, rows_per_prog=block_rows, blocks_per_prog=blocks, values=c4.table(quant_type),
        nested=nested, blocks_per_row=nblk, nested_blocksize=nested_blocksize,
        n_nested=nested_absmax.shape[0] if nested else 0, dtype=jnp.dtype(dtype),
        interpret=interpret)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, nblk, hb), jnp.float32),
        grid=(rows // block_rows, nblk // blocks),
        in_specs=in_specs,
        out_specs=full((rows, nblk, hb)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="dequant_4bit",
    )(*args)
    return jax.lax.bitcast_convert_type(out, jnp.dtype(dtype)).reshape(rows, 2 * kh)
