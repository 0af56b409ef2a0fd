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

BLOCK = 256  # bitsandbytes' state blocksize
MAX_ROWS = 16  # blocks per program: 4096 values, 16 KiB of fp32 p per operand
LUT_SIZE = 65536
# order of the scalars in ``hyper``
HYPER_FIELDS = ("b1", "one_minus_b1", "b2", "one_minus_b2", "eps", "decay", "step_size", "correction2")


def rows_per_program(nblocks: int) -> int:
    """The largest power of two <= MAX_ROWS dividing ``nblocks`` (no ragged last program)."""
    rows = MAX_ROWS
    while nblocks % rows:
        rows //= 2
    return rows


def _requantize(x, lut_ref):
    """Codes and absmax of ``x`` [rows, 256] fp32, bitsandbytes' CPU lookup-table rule."""
    absmax = jnp.max(jnp.abs(x), axis=1)
    inv = jnp.float32(1.0) / jnp.where(absmax == 0, jnp.float32(1.0), absmax)
    normed = jnp.clip(x * inv[:, None], -1.0, 1.0)
    t = (normed + jnp.float32(1.0)) * jnp.float32(0.5)
    idx = (t * jnp.float32(LUT_SIZE - 1) + jnp.float32(0.5)).astype(jnp.int32)
    codes = lut_ref[idx]
    codes = jnp.where((absmax == 0)[:, None], jnp.uint8(0), codes)
    return codes, absmax


def _adam_kernel(
    hyper_ref, p_ref, g_ref, c1_ref, a1_ref, c2_ref, a2_ref, code1_ref, code2_ref, lut1_ref, lut2_ref,
    p_out, c1_out, a1_out, c2_out, a2_out, *, n: int, rows: int,
):
    b1, omb1, b2, omb2 = hyper_ref[0], hyper_ref[1], hyper_ref[2], hyper_ref[3]
    eps, decay, step_size, correction2 = hyper_ref[4], hyper_ref[5], hyper_ref[6], hyper_ref[7]

    g = g_ref[...].astype(jnp.float32)
    p = p_ref[...].astype(jnp.float32)
    m = code1_ref[c1_ref[...].astype(jnp.int32)] * a1_ref[...][:, None]
    v = code2_ref[c2_ref[...].astype(jnp.int32)] * a2_ref[...][:, None]
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
    c1, a1 = _requantize(m, lut1_ref)
    c2, a2 = _requantize(v, lut2_ref)
    c1_out[...] = c1
    a1_out[...] = a1
    c2_out[...] = c2
    a2_out[...] = a2


@functools.partial(jax.jit, static_argnames=("n", "interpret"))
def adam8bit_blocks(hyper, p, g, codes1, absmax1, codes2, absmax2, code1, code2, lut1, lut2, *, n: int,
                    interpret: bool = False):
    """One fused Adam(W) step on [nblocks, 256] views; returns (p, codes1, absmax1, codes2, absmax2).

    ``n`` is the number of real values (the rest of the last block is padding).
    """
    nblocks = p.shape[0]
    rows = rows_per_program(nblocks)
    blk = pl.BlockSpec((rows, BLOCK), lambda i: (i, 0))
    vec = pl.BlockSpec((rows,), lambda i: (i,))

    def whole(size):
        return pl.BlockSpec((size,), lambda i: (0,))

    kernel = functools.partial(_adam_kernel, n=n, rows=rows)
    return pl.pallas_call(
        kernel,
        grid=(nblocks // rows,),
        in_specs=[whole(hyper.shape[0]), blk, blk, blk, vec, blk, vec,
                  whole(256), whole(256), whole(LUT_SIZE), whole(LUT_SIZE)],
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
    )(hyper, p, g, codes1, absmax1, codes2, absmax2, code1, code2, lut1, lut2)
