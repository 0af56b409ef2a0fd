"""Shared pieces of the 4-bit kernels: code tables, in-register decode, per-tile absmax.

The kernels read bitsandbytes' canonical layout unchanged, viewed as ``packed [N, K/2]``
(possible whenever ``K`` is a multiple of the blocksize, so no block straddles two rows):
byte ``j`` of a row holds element ``2j`` in its high nibble and ``2j+1`` in its low nibble.
Instead of interleaving the two nibble tiles in-kernel (``jnp.stack(...).reshape`` is slow
and ``concatenate`` does not lower in Triton), the *activation* is de-interleaved once
outside the kernel (``x[..., 0::2]``, ``x[..., 1::2]``: M x K, tiny next to the weight) and
the kernel does two dots, one per nibble. Byte ``j`` of either nibble lies in quantization
block ``j // (blocksize/2)``, so both halves share one absmax tile.

Decode has no gather in the Triton lowering's vector ops, so it is either a select tree over
the four code bits ("select") or a pointer load from a 16-entry table in global memory that
stays in L1 ("gather", array indexing of a ref, which the lowering turns into loads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# bitsandbytes 0.50 code tables (lowbit_jax.formats is the source of truth; pallas_kernels
# imports only jax, so the values are repeated here and a test checks they agree).
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4 = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
       0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
       -0.3333333432674408, -0.5, -0.1666666716337204, -0.25)
TABLES = {"nf4": NF4, "fp4": FP4}

DECODES = ("select", "gather")


def table(quant_type: str):
    if quant_type not in TABLES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return TABLES[quant_type]


def decode_select(codes, values):
    """fp32 code values of int32 ``codes`` (0..15) by a 4-level select tree on the code bits."""
    lvl = [jnp.where((codes & 1) != 0, jnp.float32(values[2 * i + 1]), jnp.float32(values[2 * i]))
           for i in range(8)]
    lvl = [jnp.where((codes & 2) != 0, lvl[2 * i + 1], lvl[2 * i]) for i in range(4)]
    lvl = [jnp.where((codes & 4) != 0, lvl[2 * i + 1], lvl[2 * i]) for i in range(2)]
    return jnp.where((codes & 8) != 0, lvl[1], lvl[0])


def decode_nibbles(p, values, lut_ref, method: str):
    """(high-nibble values, low-nibble values) in fp32 of a uint8 tile ``p``."""
    c = p.astype(jnp.int32)
    hi, lo = (c >> 4) & 15, c & 15
    if method == "gather":
        return lut_ref[hi], lut_ref[lo]
    return decode_select(hi, values), decode_select(lo, values)


def scale_tile(w, a, half_block: int):
    """``w`` [R, H] fp32 times its per-block absmax ``a`` [R, nb] (byte j is in block j // half_block)."""
    rows, h = w.shape
    nb = a.shape[1]
    if nb == 1:
        return w * a
    return (w.reshape(rows, nb, half_block) * a[:, :, None]).reshape(rows, h)


def absmax_tile(a_ref, rows, cols, nested):
    """fp32 absmax ``a_ref[rows, cols]``, undoing double quantization in-kernel when ``nested``.

    ``nested`` is ``None`` or ``(nested_code_ref, nested_absmax_ref, offset_ref, row0,
    blocks_per_row, nested_blocksize)``: the absmax codes are uint8 and the flat block index
    ``row * blocks_per_row + col`` picks the nested scale (one per ``nested_blocksize`` blocks).
    """
    a = a_ref[rows, cols]
    if nested is None:
        return a
    code_ref, nabs_ref, off_ref, row0, col0, bpr, nbs = nested
    r = jax.lax.broadcasted_iota(jnp.int32, a.shape, 0) + row0
    c = jax.lax.broadcasted_iota(jnp.int32, a.shape, 1) + col0
    flat = r * bpr + c
    v = code_ref[a.astype(jnp.int32)] * nabs_ref[flat // nbs]
    return v + off_ref[0]
