"""Fused 4-bit (NF4/FP4) GEMM: ``y = x @ W.T`` and the backward ``dx = g @ W``, W never in HBM.

Prefill/training path. Each program owns a ``[BM, BN]`` output tile (forward) or a
``[BM, 2*BH]`` slice of dx (backward), streams the packed codes of its weight rows in tiles
of ``BH`` bytes (2*BH elements), decodes them to x's dtype in registers and feeds them to the
tensor cores with fp32 accumulation. See ``_4bit_common`` for the layout argument (the
canonical bitsandbytes bytes, read as ``[N, K/2]``, activations de-interleaved outside).

The same forward body with ``splits > 1`` is the split-K GEMV of ``gemv_4bit``: programs
along the third grid axis each take a contiguous K chunk and write fp32 partials that the
caller sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _4bit_common as c4

# launch defaults (forward GEMM); ops.matmul_4bit passes measured ones on the GPU
BM, BN, BH = 64, 64, 64
NUM_WARPS, NUM_STAGES = 4, 3


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _tile_absmax(a_ref, kb, bh, half_block, nested_args, row0, col_base):
    """Absmax for byte tile ``kb`` of this program's rows: [rows, max(1, bh // half_block)]."""
    if bh >= half_block:
        nbt = bh // half_block
        col = kb * nbt
    else:
        nbt = 1
        col = (kb * bh) // half_block
    nested = None
    if nested_args is not None:
        nested = (*nested_args[:3], row0, col_base + col, *nested_args[3:])
    return c4.absmax_tile(a_ref, slice(None), pl.ds(col, nbt), nested)


def forward_body(xe_ref, xo_ref, p_ref, a_ref, *rest, bh, half_block, n_ktiles, values, decode,
                 nested, has_bias, mode, block_n, blocks_per_row, nested_blocksize, kchunk_blocks,
                 orient, interpret, num_threads):
    """One output tile: loop over byte tiles of this program's K range, decode, accumulate."""
    rest = list(rest)
    lut_ref = rest.pop(0) if decode == "gather" else None
    nested_args = None
    if nested:
        ncode_ref, nabs_ref, off_ref = rest.pop(0), rest.pop(0), rest.pop(0)
        nested_args = (ncode_ref, nabs_ref, off_ref, blocks_per_row, nested_blocksize)
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    cdt = xe_ref.dtype
    row0 = pl.program_id(1) * block_n
    col_base = pl.program_id(2) * kchunk_blocks
    bm = xe_ref.shape[0]
    # "lut": the shared-memory byte table, filled once a program before the loop
    base = c4.lut_base(values, cdt, num_threads, (block_n, bh), interpret) if decode == "lut" else None

    def weights(kb):
        p = p_ref[:, pl.ds(kb * bh, bh)]
        a = _tile_absmax(a_ref, kb, bh, half_block, nested_args, row0, col_base)
        if decode == "lut":  # scaled in the decode, already rounded to x's dtype
            return c4.decode_scaled(p, c4.byte_scales(a, p.shape, half_block), base, values, cdt, interpret)
        hi, lo = c4.decode_nibbles(p, values, lut_ref, decode, interpret)
        return c4.scale_tile(hi, a, half_block), c4.scale_tile(lo, a, half_block)

    if mode == "dot":
        dims = (((1,), (1,)), ((), ()))
        prec = _precision(cdt)

        # orient "wx": the decoded weight tile is the dot's left operand and the result the
        # transposed tile (Hopper's wgmma takes its left operand from registers, its right
        # from shared memory), transposed once at the end
        wx = orient == "wx"

        def body(kb, acc):
            hi, lo = weights(kb)
            xe = xe_ref[:, pl.ds(kb * bh, bh)]
            xo = xo_ref[:, pl.ds(kb * bh, bh)]
            for xs, w in ((xe, hi), (xo, lo)):
                a, b = (w.astype(cdt), xs) if wx else (xs, w.astype(cdt))
                acc += jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
            return acc

        shape = (block_n, bm) if wx else (bm, block_n)
        acc = jax.lax.fori_loop(0, n_ktiles, body, jnp.zeros(shape, jnp.float32))
        if wx:
            acc = acc.T
    else:  # "fma": a few rows, elementwise multiply-add into [BN, BH] accumulators, one reduce
        def body(kb, accs):
            hi, lo = weights(kb)
            # round the weights to x's dtype, as the reference does, then accumulate in fp32
            hi = hi.astype(cdt).astype(jnp.float32)
            lo = lo.astype(cdt).astype(jnp.float32)
            # rows come straight from the refs: value slicing and stack do not lower in Triton
            cols = pl.ds(kb * bh, bh)
            return tuple(accs[m] + hi * xe_ref[pl.ds(m, 1), cols].astype(jnp.float32)
                         + lo * xo_ref[pl.ds(m, 1), cols].astype(jnp.float32) for m in range(bm))

        accs = jax.lax.fori_loop(0, n_ktiles, body,
                                 tuple(jnp.zeros((block_n, bh), jnp.float32) for _ in range(bm)))
        row = jax.lax.broadcasted_iota(jnp.int32, (bm, block_n), 0)
        acc = jnp.zeros((bm, block_n), jnp.float32)
        for m, a in enumerate(accs):
            acc = jnp.where(row == m, jnp.sum(a, axis=1)[None, :], acc)
    if has_bias:
        acc = acc + bias_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = acc.reshape(o_ref.shape).astype(o_ref.dtype)


def fused_forward(xe, xo, packed, absmax, *, quant_type, blocksize, nested_absmax=None,
                  nested_code=None, offset=None, nested_blocksize=256, bias=None, block_m=BM,
                  block_n=BN, block_h=BH, splits=1, mode="dot", decode="select", out_dtype=None,
                  orient="xw", num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=False):
    """The raw launch. Shapes must already tile exactly (the wrapper pads):

    xe, xo  [M, K/2]  x's even / odd columns (M a multiple of block_m)
    packed  [N, K/2]  uint8 (N a multiple of block_n; K/2 a multiple of splits * block_h)
    absmax  [N, K/blocksize] fp32, or uint8 codes with nested_absmax/nested_code/offset
    bias    [N] or None (only with splits == 1)
    Returns [M, N] in ``out_dtype`` (splits == 1) or fp32 partials [splits, M, N].
    """
    m, kh = xe.shape
    n = packed.shape[0]
    half_block = blocksize // 2
    kc = kh // splits  # bytes per split
    if m % block_m or n % block_n or kh % splits or kc % block_h:
        raise ValueError(f"untiled launch: M={m}, N={n}, K/2={kh}, tiles {block_m}x{block_n}x{block_h}, splits {splits}")
    if (kc * 2) % blocksize:
        raise ValueError(f"a K split ({kc * 2}) must hold whole blocks of {blocksize}")
    if bias is not None and splits != 1:
        raise ValueError("bias is added by the caller when splits > 1")
    kchunk_blocks = kc * 2 // blocksize
    blocks_per_row = kh * 2 // blocksize
    nested = nested_absmax is not None
    values = c4.table(quant_type)
    out_dtype = jnp.dtype(out_dtype or xe.dtype)
    if decode in ("prmt", "lut") and xe.dtype == jnp.float32:
        decode = "select"  # 16-bit code values would cost fp32 activations precision

    in_specs = [
        pl.BlockSpec((block_m, kc), lambda i, j, s: (i, s)),
        pl.BlockSpec((block_m, kc), lambda i, j, s: (i, s)),
        pl.BlockSpec((block_n, kc), lambda i, j, s: (j, s)),
        pl.BlockSpec((block_n, kchunk_blocks), lambda i, j, s: (j, s)),
    ]
    args = [xe, xo, packed, absmax]
    if decode == "gather":
        args.append(jnp.asarray(values, jnp.float32))
        in_specs.append(pl.BlockSpec((16,), lambda i, j, s: (0,)))
    if nested:
        nn_ = nested_absmax.shape[0]
        args += [jnp.asarray(nested_code, jnp.float32), nested_absmax.astype(jnp.float32),
                 jnp.reshape(offset, (1,)).astype(jnp.float32)]
        in_specs += [pl.BlockSpec((256,), lambda i, j, s: (0,)),
                     pl.BlockSpec((nn_,), lambda i, j, s: (0,)),
                     pl.BlockSpec((1,), lambda i, j, s: (0,))]
    if bias is not None:
        args.append(bias)
        in_specs.append(pl.BlockSpec((block_n,), lambda i, j, s: (j,)))
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((1, block_m, block_n), lambda i, j, s: (s, i, j))
    kernel = functools.partial(
        forward_body, bh=block_h, half_block=half_block, n_ktiles=kc // block_h, values=values,
        decode=decode, nested=nested, has_bias=bias is not None, mode=mode, block_n=block_n,
        blocks_per_row=blocks_per_row, nested_blocksize=nested_blocksize,
        kchunk_blocks=kchunk_blocks, orient=orient, interpret=interpret, num_threads=32 * num_warps)
    if orient not in ("xw", "wx"):
        raise ValueError(f"orient must be 'xw' or 'wx', got {orient!r}")
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(m // block_m, n // block_n, splits),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*args)


def backward_body(g_ref, p_ref, a_ref, *rest, bh, half_block, n_ntiles, block_n, values, decode,
                  nested, blocks_per_row, nested_blocksize, interpret):
    """dx tile [BM, 2*BH] = g [BM, N] @ W[:, this byte range]: loop over N, decode, two dots."""
    rest = list(rest)
    lut_ref = rest.pop(0) if decode == "gather" else None
    nested_args = None
    if nested:
        ncode_ref, nabs_ref, off_ref = rest.pop(0), rest.pop(0), rest.pop(0)
        nested_args = (ncode_ref, nabs_ref, off_ref, blocks_per_row, nested_blocksize)
    oe_ref, oo_ref = rest
    cdt = g_ref.dtype
    kb = pl.program_id(1)  # byte tile of K/2 this program owns
    bm = g_ref.shape[0]
    prec = _precision(cdt)
    if bh >= half_block:
        nbt, col = bh // half_block, kb * (bh // half_block)
    else:
        nbt, col = 1, (kb * bh) // half_block

    def body(nb, accs):
        acc_e, acc_o = accs
        rows = pl.ds(nb * block_n, block_n)
        p = p_ref[rows, :]
        nested_t = None if nested_args is None else (*nested_args[:3], nb * block_n, col, *nested_args[3:])
        a = c4.absmax_tile(a_ref, rows, pl.ds(col, nbt), nested_t)
        hi, lo = c4.decode_nibbles(p, values, lut_ref, decode, interpret)
        hi = c4.scale_tile(hi, a, half_block).astype(cdt)
        lo = c4.scale_tile(lo, a, half_block).astype(cdt)
        g = g_ref[:, rows]
        acc_e += jnp.dot(g, hi, precision=prec, preferred_element_type=jnp.float32)
        acc_o += jnp.dot(g, lo, precision=prec, preferred_element_type=jnp.float32)
        return acc_e, acc_o

    zeros = jnp.zeros((bm, bh), jnp.float32)
    acc_e, acc_o = jax.lax.fori_loop(0, n_ntiles, body, (zeros, zeros))
    oe_ref[...] = acc_e.astype(oe_ref.dtype)
    oo_ref[...] = acc_o.astype(oo_ref.dtype)


def fused_backward(g, packed, absmax, *, quant_type, blocksize, nested_absmax=None,
                   nested_code=None, offset=None, nested_blocksize=256, block_m=64, block_n=64,
                   block_h=64, decode="select", num_warps=4, num_stages=3, interpret=False):
    """dx = g @ W as (dx_even, dx_odd) [M, K/2] in g's dtype. g [M, N] (M a multiple of
    block_m, N of block_n); packed [N, K/2] (K/2 a multiple of block_h)."""
    m, n = g.shape
    kh = packed.shape[1]
    half_block = blocksize // 2
    if m % block_m or n % block_n or kh % block_h:
        raise ValueError(f"untiled launch: M={m}, N={n}, K/2={kh}, tiles {block_m}x{block_n}x{block_h}")
    if block_h < half_block and half_block % block_h:
        raise ValueError(f"block_h ({block_h}) and blocksize/2 ({half_block}) must nest")
    nested = nested_absmax is not None
    values = c4.table(quant_type)
    if decode == "prmt" and g.dtype == jnp.float32:
        decode = "select"
    nbt = max(1, block_h // half_block)
    blocks_per_row = kh * 2 // blocksize
    in_specs = [
        pl.BlockSpec((block_m, n), lambda i, k: (i, 0)),
        pl.BlockSpec((n, block_h), lambda i, k: (0, k)),
        pl.BlockSpec((n, blocks_per_row), lambda i, k: (0, 0)),
    ]
    args = [g, packed, absmax]
    if decode == "gather":
        args.append(jnp.asarray(values, jnp.float32))
        in_specs.append(pl.BlockSpec((16,), lambda i, k: (0,)))
    if nested:
        nn_ = nested_absmax.shape[0]
        args += [jnp.asarray(nested_code, jnp.float32), nested_absmax.astype(jnp.float32),
                 jnp.reshape(offset, (1,)).astype(jnp.float32)]
        in_specs += [pl.BlockSpec((256,), lambda i, k: (0,)),
                     pl.BlockSpec((nn_,), lambda i, k: (0,)),
                     pl.BlockSpec((1,), lambda i, k: (0,))]
    del nbt
    kernel = functools.partial(
        backward_body, bh=block_h, half_block=half_block, n_ntiles=n // block_n, block_n=block_n,
        values=values, decode=decode, nested=nested, blocks_per_row=blocks_per_row,
        nested_blocksize=nested_blocksize, interpret=interpret)
    out = jax.ShapeDtypeStruct((m, kh), g.dtype)
    spec = pl.BlockSpec((block_m, block_h), lambda i, k: (i, k))
    return pl.pallas_call(
        kernel,
        out_shape=(out, out),
        grid=(m // block_m, kh // block_h),
        in_specs=in_specs,
        out_specs=(spec, spec),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(*args)
