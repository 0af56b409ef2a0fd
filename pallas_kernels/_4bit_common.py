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

DECODES = ("select", "gather", "prmt")


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


def _prmt_asm(values, nibble: str) -> str:
    """PTX decoding the 8 nibbles of 4 packed bytes to 8 fp16 table values with byte permutes.

    The fp16 table is split into its low and high bytes, 4 registers each (L0..L3, H0..H3).
    For 4 codes: their low 3 bits select a byte from an 8-byte half-table (``prmt``), their
    top bit picks the half (a byte mask made by ``prmt``'s sign-replicate mode, merged with
    ``lop3``), and two more ``prmt`` interleave low and high bytes into fp16 pairs. About 4
    instructions a value, against ~20 for the select tree.
    """
    import numpy as np

    bits = np.asarray(values, np.float16).view(np.uint16).astype(np.uint32)
    lo_b, hi_b = bits & 0xFF, bits >> 8
    word = lambda b, i: int(b[4 * i] | (b[4 * i + 1] << 8) | (b[4 * i + 2] << 16) | (b[4 * i + 3] << 24))
    consts = "".join(f"mov.b32 L{i}, {word(lo_b, i):#010x};\n mov.b32 H{i}, {word(hi_b, i):#010x};\n"
                     for i in range(4))

    def half(src, o0, o1):
        return f"""
 prmt.b32 s, {src}, zero, 0x4420;
 and.b32 idx, s, 0x7777;
 and.b32 m8, s, 0x8888;
 shr.b32 sm, m8, 1;
 or.b32 sm, sm, m8;
 prmt.b32 msk, zero, sgn, sm;
 prmt.b32 a, L0, L1, idx;
 prmt.b32 b, L2, L3, idx;
 lop3.b32 lo, a, b, msk, 0xD8;
 prmt.b32 a, H0, H1, idx;
 prmt.b32 b, H2, H3, idx;
 lop3.b32 hi, a, b, msk, 0xD8;
 prmt.b32 {o0}, lo, hi, 0x5140;
 prmt.b32 {o1}, lo, hi, 0x7362;
"""
    head = ("{\n .reg .b32 t, u, s, idx, m8, sm, msk, a, b, lo, hi, zero, sgn, L0, L1, L2, L3, H0, H1, H2, H3;\n"
            " mov.b32 zero, 0;\n mov.b32 sgn, 0x80808080;\n" + consts)
    # one asm per nibble (Pallas lowers single-result inline asm only): outputs $0,$1, input $2.
    # The codes go to the low nibble of each byte, then pairs of bytes into one byte.
    if nibble == "hi":
        body = " shr.b32 t, $2, 4;\n and.b32 t, t, 0x0F0F0F0F;\n"
    else:
        body = " and.b32 t, $2, 0x0F0F0F0F;\n"
    return head + body + " shr.b32 u, t, 4;\n or.b32 u, u, t;\n" + half("u", "$0", "$1") + "}"


def decode_prmt(p, values):
    from jax.experimental.pallas import triton as pltriton

    out = jax.ShapeDtypeStruct(p.shape, jnp.float16)
    hi, lo = (pltriton.elementwise_inline_asm(_prmt_asm(values, nib), args=[p], constraints="=r,=r,r",
                                              pack=4, result_shape_dtypes=[out])[0]
              for nib in ("hi", "lo"))
    return hi, lo


def decode_nibbles(p, values, lut_ref, method: str, interpret: bool = False):
    """(high-nibble values, low-nibble values) in fp32 of a uint8 tile ``p``.

    "prmt" decodes to fp16 table values (inline PTX, GPU only; 2^-11 relative rounding of
    the code, so it serves fp16/bf16 activations); in the interpreter it is emulated.
    """
    if method == "prmt" and not interpret:
        hi, lo = decode_prmt(p, values)
        return hi.astype(jnp.float32), lo.astype(jnp.float32)
    c = p.astype(jnp.int32)
    hi, lo = (c >> 4) & 15, c & 15
    if method == "gather":
        return lut_ref[hi], lut_ref[lo]
    hi, lo = decode_select(hi, values), decode_select(lo, values)
    if method == "prmt":
        return hi.astype(jnp.float16).astype(jnp.float32), lo.astype(jnp.float16).astype(jnp.float32)
    return hi, lo


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
