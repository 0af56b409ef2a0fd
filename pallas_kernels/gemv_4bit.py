"""Fused 4-bit (NF4/FP4) GEMV for one row of x (decode at batch 1), streaming whole cache lines.

At M=1 the weight is read once, so the kernel must stream 30 MB at close to the copy
bandwidth while spending as few instructions per weight as it can. The canonical bytes are
read as ``[N, K/blocksize, blocksize/2]`` (a free view): a program owns ``block_n`` rows and
streams ``blocks_per_iter`` whole quantization blocks of each per iteration, so every warp
reads contiguous runs of a row (whole cache lines). Each byte's two codes are decoded by
inline-PTX byte permutes straight to x's 16-bit dtype; x is read as one 32-bit pair per byte.
Per block the dot product times the block's absmax (double quantization undone in-kernel)
adds into an accumulator reduced once at the end. One kernel a layer: no x split, no split-K
reduction (``splits > 1`` is there for layers with few rows, fp32 partials summed by the
caller).

Two engines for the block dot products:
- "mma" (what ``ops.matmul_4bit`` picks for blocksize 64): a warp's ``mma.m16n8k16``
  computes them, x pairs as the A fragment, decoded byte pairs as B, each block's sum on the
  product's diagonal (``_4bit_common.mma_rowsum``: the lane layout and the bookkeeping). The
  multiply-adds cost ~1/32 of an instruction a weight; the decode reads one entry a byte of a
  shared-memory table of decoded pairs (``_4bit_common.lut_base`` fills it once a program):
  18.4-19.6 us at K=4096, N=14336 on an H100, bound by the loads' latency (eighth session;
  21.7-23.5 with the byte-permute decode, which was integer-ALU-bound).
- "rowsum": fp32 multiply-adds on the CUDA cores (~9.8 instructions a weight: 25-27 us), for
  blocksizes other than 64.

Measured against the split-K tensor-core GEMV before both (32-64 bytes of 64-128 rows a tile,
absmax per element): 42-43 us (benchmarks/KERNEL_NOTES.md). Rows of x beyond one go through
the tensor-core kernels of ``gemm_4bit``, which share the decode across rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _4bit_common as c4

# launch defaults (measured best on an H100); ops.matmul_4bit passes GPU_CONFIG["gemv"]
ROWS, ROW_BLOCKS = 8, 16  # weight rows a program, quantization blocks of each an iteration
ENGINES = ("rowsum", "mma")


def _gemv_body(x_ref, p_ref, a_ref, *rest, bn, tb, n_iters, values, nested, has_bias,
                 blocks_per_row, nested_blocksize, n_nested, kchunk_blocks, prefetch, xdtype,
                 interpret, stacked, engine, num_threads):
    """``bn`` output rows: stream ``tb`` blocks (tb * blocksize/2 contiguous bytes) of each
    row per iteration; per block a dot product in fp32, times its absmax; sum at the end.
    ``stacked``: the weight operands carry a leading layer axis and the first operand after
    them is the layer to read. ``engine``: "rowsum" (fp32 multiply-adds on CUDA cores) or
    "mma" (the block dots on the tensor cores, ``_4bit_common.mma_rowsum``)."""
    rest = list(rest)
    layer_ref = rest.pop(0) if stacked else None
    if nested:
        ncode_ref, nabs_ref, off_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    bias_ref = rest.pop(0) if has_bias else None
    (o_ref,) = rest
    row0 = pl.program_id(0) * bn
    col_base = pl.program_id(1) * kchunk_blocks
    # stacked: this layer's rows, the index a pointer offset (nothing is copied)
    at = (layer_ref[0],) if stacked else ()
    mma = engine == "mma"

    def load(it):
        cols = pl.ds(it * tb, tb)
        if mma:  # [bn, tb, 4, 8] bytes: each block as 4 chunks of 8; x pairs likewise [tb, 4, 8]
            return (p_ref[(*at, slice(None), cols, slice(None), slice(None))], a_ref[(*at, slice(None), cols)],
                    x_ref[0, cols, :, :])
        return p_ref[(*at, slice(None), cols, slice(None))], a_ref[(*at, slice(None), cols)], x_ref[0, cols, :]

    def scales(a, it):
        if not nested:
            return a.astype(jnp.float32)
        shape = (bn, tb)
        flat = ((jax.lax.broadcasted_iota(jnp.int32, shape, 0) + row0) * blocks_per_row
                + jax.lax.broadcasted_iota(jnp.int32, shape, 1) + (col_base + it * tb))
        nidx = jnp.minimum(flat // nested_blocksize, n_nested - 1)  # padded rows: clamp
        return ncode_ref[a.astype(jnp.int32)] * nabs_ref[(*at, nidx)] + off_ref[at[0] if stacked else 0]

    first = load(0) if prefetch else None  # issued before the table fill: the fill hides their latency
    lut = None
    if mma and c4.MMA_DECODE == "lut":  # the byte table, filled once a program before the loop
        lut = c4.lut_base(values, xdtype, num_threads, (bn, tb, 4, c4.MMA_CHUNK), interpret)

    def compute(tiles, it, acc):
        if mma:  # acc: int32 bits of fp32 partial sums, [bn, tb, 4, 8]
            p, a, u = tiles
            sc = jnp.broadcast_to(scales(a, it)[:, :, None, None], p.shape)
            return c4.mma_rowsum(p, jnp.broadcast_to(u[None], p.shape), sc, acc, values, xdtype, lut, interpret)
        p, a, u = tiles  # [bn, tb, hb] uint8, [bn, tb] absmax, [tb, hb] x pairs (uint32)
        xe, xo = c4.unpack_pairs(u, xdtype)
        hi, lo = c4.decode16(p, values, xdtype, interpret)
        part = jnp.sum(hi.astype(jnp.float32) * xe[None] + lo.astype(jnp.float32) * xo[None], axis=2)
        return acc + part * scales(a, it)

    zeros = jnp.zeros((bn, tb, 4, c4.MMA_CHUNK), jnp.int32) if mma else jnp.zeros((bn, tb), jnp.float32)
    if prefetch:
        def body(it, carry):
            nxt = load(jnp.minimum(it + 1, n_iters - 1))
            return (compute(carry[1:], it, carry[0]), *nxt)

        acc = jax.lax.fori_loop(0, n_iters, body, (zeros, *first))[0]
    else:
        acc = jax.lax.fori_loop(0, n_iters, lambda it, acc: compute(load(it), it, acc), zeros)
    if mma:
        acc = jnp.sum(jnp.sum(jax.lax.bitcast_convert_type(acc, jnp.float32), axis=3), axis=2)
    y = jnp.sum(acc, axis=1)
    if has_bias:
        y = y + bias_ref[...].astype(jnp.float32)
    o_ref[...] = y.reshape(o_ref.shape).astype(o_ref.dtype)


def gemv_4bit(x, packed, absmax, *, quant_type, blocksize, nested_absmax=None, nested_code=None,
              offset=None, nested_blocksize=256, bias=None, block_n=ROWS, blocks_per_iter=ROW_BLOCKS,
              splits=1, prefetch=True, num_warps=4, num_stages=1, interpret=False, layer=None,
              engine="rowsum"):
    """``x @ W.T (+ bias)`` for ONE row of 16-bit x ``[1, K]``: ``[1, N]`` in x's dtype.

    ``packed`` ``[N, K/2]`` uint8 (N a multiple of ``block_n``), ``absmax`` ``[N, K/blocksize]``
    fp32, or uint8 codes with ``nested_absmax``/``nested_code``/``offset``. ``blocks_per_iter``
    must divide the K/blocksize/splits blocks of a split. ``prefetch`` carries the next
    iteration's tiles through the loop (2% faster on an H100 at N=14336, within noise).

    ``layer`` (an int32 scalar, may be traced): ``packed``, ``absmax``, ``nested_absmax`` and
    ``offset`` are stacked over a leading layer axis (``[L, N, K/2]``, ...) and the kernel
    reads layer ``layer`` in place. Slicing a layer out first is a copy of it in XLA (a custom
    call takes whole buffers): in a scanned batch-1 decode those copies took longer than the
    GEMVs themselves.

    ``engine``: "rowsum" (fp32 multiply-adds, any blocksize) or "mma" (each block's dot product
    on the tensor cores, ``_4bit_common.mma_rowsum``; blocksize 64 only).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "mma" and blocksize != 64:
        raise ValueError(f"engine='mma' needs blocksize 64, got {blocksize}")
    stacked = layer is not None
    n_layers = packed.shape[0] if stacked else None
    if stacked and (packed.ndim != 3 or absmax.ndim != 3 or absmax.shape[0] != n_layers):
        raise ValueError(f"layer= needs stacked operands [L, N, K/2] and [L, N, K/blocksize], got "
                         f"{packed.shape} and {absmax.shape}")
    m, k = x.shape
    n, kh = packed.shape[-2:]
    if m != 1:
        raise ValueError(f"gemv_4bit takes one row of x, got {m}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"gemv_4bit takes bf16/fp16 x, got {x.dtype}")
    hb = blocksize // 2
    blocks = k // blocksize
    if kh * 2 != k or k % blocksize or n % block_n:
        raise ValueError(f"untiled launch: K={k}, packed {packed.shape}, blocksize {blocksize}, block_n {block_n}")
    if blocks % splits or (blocks // splits) % blocks_per_iter:
        raise ValueError(f"{blocks} blocks a row do not split into {splits} x {blocks_per_iter}k")
    kchunk_blocks = blocks // splits
    # free views: x as 32-bit pairs per block, W as [rows, blocks, bytes of a block] (mma: each
    # block's bytes and pairs as [4, 8] chunks)
    inner = (4, c4.MMA_CHUNK) if engine == "mma" else (hb,)
    x3 = jax.lax.bitcast_convert_type(x.reshape(1, blocks, hb, 2), jnp.uint32).reshape(1, blocks, *inner)
    zi = (0,) * len(inner)
    nested = nested_absmax is not None
    # stacked: every layer in the block (leading axis), the kernel indexes one
    lead, z = ((n_layers,), (0,)) if stacked else ((), ())
    in_specs = [pl.BlockSpec((1, kchunk_blocks, *inner), lambda j, s: (0, s, *zi)),
                pl.BlockSpec((*lead, block_n, kchunk_blocks, *inner), lambda j, s: (*z, j, s, *zi)),
                pl.BlockSpec((*lead, block_n, kchunk_blocks), lambda j, s: (*z, j, s))]
    args = [x3, packed.reshape(*lead, n, blocks, *inner), absmax]
    if stacked:
        in_specs.append(pl.BlockSpec((1,), lambda j, s: (0,)))
        args.append(jnp.reshape(layer, (1,)).astype(jnp.int32))
    if nested:
        nn_ = nested_absmax.shape[-1]
        n_off = n_layers if stacked else 1
        args += [jnp.asarray(nested_code, jnp.float32), nested_absmax.astype(jnp.float32),
                 jnp.reshape(offset, (n_off,)).astype(jnp.float32)]
        in_specs += [pl.BlockSpec((256,), lambda j, s: (0,)), pl.BlockSpec((*lead, nn_), lambda j, s: (*z, 0)),
                     pl.BlockSpec((n_off,), lambda j, s: (0,))]
    fuse_bias = bias is not None and splits == 1
    if fuse_bias:
        args.append(bias)
        in_specs.append(pl.BlockSpec((block_n,), lambda j, s: (j,)))
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((n,), x.dtype)
        out_spec = pl.BlockSpec((block_n,), lambda j, s: (j,))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, n), jnp.float32)
        out_spec = pl.BlockSpec((1, block_n), lambda j, s: (s, j))
    kernel = functools.partial(
        _gemv_body, bn=block_n, tb=blocks_per_iter, n_iters=kchunk_blocks // blocks_per_iter,
        values=c4.table(quant_type), nested=nested, has_bias=fuse_bias, blocks_per_row=blocks,
        nested_blocksize=nested_blocksize, n_nested=nested_absmax.shape[-1] if nested else 0,
        kchunk_blocks=kchunk_blocks, prefetch=prefetch, xdtype=jnp.dtype(x.dtype), interpret=interpret,
        stacked=stacked, engine=engine, num_threads=32 * num_warps)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(n // block_n, splits),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gemv_4bit",
    )(*args)
    if splits == 1:
        return out.reshape(1, n)
    y = jnp.sum(out, axis=0)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype).reshape(1, n)
