"""Fused 8-bit Adam(W) step: one pass per 256-value block, states never leave registers in fp32.

Each program takes ``ROWS`` blocks of 256 values and reads p, g, the two moments' uint8 codes
and their fp32 absmax; it dequantizes (a gather from the 256-entry map), updates in fp32 with
bitsandbytes' formula, takes the fresh block absmax and requantizes with bitsandbytes' CPU
rounding rule (a 65536-bin lookup table, so codes are bit-identical to the jnp reference); it
writes p, codes and absmax back in place (``input_output_aliases``). 16 bytes a parameter move
(fp32 p: 4+4 read/write, g 4, codes 2+2, absmax ~0.03) against fp32 Adam's 28.

The maps and tables are gathered from global memory with array indexers, which Pallas' Triton
lowering turns into pointer loads (the tables are 1 KiB and 64 KiB, so they stay in L1/L2).

Scalars arrive as a small fp32 vector (``HYPER_FIELDS``) so learning-rate schedules and
injected hyperparameters stay traced values instead of recompiling the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK = 256  # bitsandbytes' state blocksize
MAX_ROWS = 32  # blocks per program: 8192 values; fastest of 8/16/32 on the H100 (benchmarks/RESULTS.md)
LUT_SIZE = 65536
QUANTIZER = "lut"  # default table reading, see _requantize
# order of the scalars in ``hyper``
HYPER_FIELDS = ("b1", "one_minus_b1", "b2", "one_minus_b2", "eps", "decay", "step_size", "correction2")


def rows_per_program(nblocks: int) -> int:
    """The largest power of two <= MAX_ROWS dividing ``nblocks`` (no ragged last program)."""
    rows = MAX_ROWS
    while nblocks % rows:
        rows //= 2
    return rows


def _dequantize(codes_ref, absmax_ref, code_ref):
    """fp32 values of a [rows, 256] block of codes: a gather from the 1 KiB map, times absmax."""
    return code_ref[codes_ref[...].astype(jnp.int32)] * absmax_ref[...][:, None]


def _lut_index(x):
    """Absmax of each row of ``x`` [rows, 256] and the lookup-table bin of every value."""
    absmax = jnp.max(jnp.abs(x), axis=1)
    inv = jnp.float32(1.0) / jnp.where(absmax == 0, jnp.float32(1.0), absmax)
    normed = jnp.clip(x * inv[:, None], -1.0, 1.0)
    t = (normed + jnp.float32(1.0)) * jnp.float32(0.5)
    idx = (t * jnp.float32(LUT_SIZE - 1) + jnp.float32(0.5)).astype(jnp.int32)
    return idx, absmax


def _requantize(x, table_ref, quantizer: str):
    """Codes and absmax of ``x`` [rows, 256] fp32 by bitsandbytes' CPU lookup-table rule.

    "lut": one gather from the 64 KiB table. "bsearch": the same answer as an 8-step binary
    search over the 256 bin thresholds where the code changes (``lut_thresholds``): eight
    gathers, but from 1 KiB, which a warp reads in far fewer cache lines.
    """
    idx, absmax = _lut_index(x)
    if quantizer == "lut":
        codes = table_ref[idx]
    else:
        k = jnp.zeros(idx.shape, jnp.int32)
        for step in (128, 64, 32, 16, 8, 4, 2, 1):
            cand = k + step
            k = jnp.where(table_ref[cand] <= idx, cand, k)
        codes = k.astype(jnp.uint8)
    codes = jnp.where((absmax == 0)[:, None], jnp.uint8(0), codes)
    return codes, absmax


def lut_thresholds(lut):
    """int32 [256]: the first table bin whose code is >= k (65536 where none is)."""
    keys = jnp.arange(256, dtype=jnp.int32)
    # compare_all: no loop (a searchsorted loop costs a device round trip per step on GPU)
    return jnp.searchsorted(lut.astype(jnp.int32), keys, side="left", method="compare_all").astype(jnp.int32)


def _adam_kernel(
    hyper_ref, p_ref, g_ref, c1_ref, a1_ref, c2_ref, a2_ref, code1_ref, code2_ref, lut1_ref, lut2_ref,
    p_out, c1_out, a1_out, c2_out, a2_out, *, n: int, rows: int, quantizer: str,
):
    b1, omb1, b2, omb2 = hyper_ref[0], hyper_ref[1], hyper_ref[2], hyper_ref[3]
    eps, decay, step_size, correction2 = hyper_ref[4], hyper_ref[5], hyper_ref[6], hyper_ref[7]

    g = g_ref[...].astype(jnp.float32)
    p = p_ref[...].astype(jnp.float32)
    m = _dequantize(c1_ref, a1_ref, code1_ref)
    v = _dequantize(c2_ref, a2_ref, code2_ref)
    if n % BLOCK:  # the padded tail of the last block must not enter its absmax
        flat = (pl.program_id(0) * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, BLOCK), 0)) * BLOCK
        valid = flat + jax.lax.broadcasted_iota(jnp.int32, (rows, BLOCK), 1) < n
        g = jnp.where(valid, g, 0.0)
        m = jnp.where(valid, m, 0.0)
        v = jnp.where(valid, v, 0.0)

    m = m * b1 + g * omb1
    v = v * b2 + (g * g) * omb2
    denom = jnp.sqrt(v) / correction2 + eps
    p = p * decay + step_size * (m / denom)

    p_out[...] = p.astype(p_out.dtype)
    c1, a1 = _requantize(m, lut1_ref, quantizer)
    c2, a2 = _requantize(v, lut2_ref, quantizer)
    c1_out[...] = c1
    a1_out[...] = a1
    c2_out[...] = c2
    a2_out[...] = a2


@functools.partial(jax.jit, static_argnames=("n", "interpret", "quantizer", "rows", "num_warps"))
def adam8bit_blocks(hyper, p, g, codes1, absmax1, codes2, absmax2, code1, code2, lut1, lut2, *, n: int,
                    interpret: bool = False, quantizer: str = QUANTIZER, rows: int | None = None,
                    num_warps: int | None = None):
    """One fused Adam(W) step on [nblocks, 256] views; returns (p, codes1, absmax1, codes2, absmax2).

    ``n`` is the number of real values (the rest of the last block is padding). ``lut1/2`` are
    the uint8 [65536] tables of the two maps (``quant._code_lut``); ``quantizer`` picks how the
    kernel reads them (see ``_requantize``), both giving the same codes.
    """
    if quantizer not in ("lut", "bsearch"):
        raise ValueError(f"quantizer must be 'lut' or 'bsearch', got {quantizer!r}")
    nblocks = p.shape[0]
    rows = rows or rows_per_program(nblocks)
    if nblocks % rows:
        raise ValueError(f"rows must divide the number of blocks {nblocks}, got {rows}")
    if quantizer == "bsearch":
        lut1, lut2 = lut_thresholds(lut1), lut_thresholds(lut2)
    table = lut1.shape[0]
    blk = pl.BlockSpec((rows, BLOCK), lambda i: (i, 0))
    vec = pl.BlockSpec((rows,), lambda i: (i,))

    def whole(size):
        return pl.BlockSpec((size,), lambda i: (0,))

    kernel = functools.partial(_adam_kernel, n=n, rows=rows, quantizer=quantizer)
    extra = {}
    if num_warps is not None and not interpret:
        extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps)
    return pl.pallas_call(
        kernel,
        grid=(nblocks // rows,),
        in_specs=[whole(hyper.shape[0]), blk, blk, blk, vec, blk, vec,
                  whole(256), whole(256), whole(table), whole(table)],
        out_specs=[blk, blk, vec, blk, vec],
        out_shape=[
            jax.ShapeDtypeStruct(p.shape, p.dtype),
            jax.ShapeDtypeStruct(codes1.shape, jnp.uint8),
            jax.ShapeDtypeStruct(absmax1.shape, jnp.float32),
            jax.ShapeDtypeStruct(codes2.shape, jnp.uint8),
            jax.ShapeDtypeStruct(absmax2.shape, jnp.float32),
        ],
        input_output_aliases={1: 0, 3: 1, 4: 2, 5: 3, 6: 4},
        interpret=interpret,
        **extra,
    )(hyper, p, g, codes1, absmax1, codes2, absmax2, code1, code2, lut1, lut2)
