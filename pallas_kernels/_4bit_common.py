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

DECODES = ("select", "gather", "prmt", "lut")


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


def _table_bits(values, dtype) -> "np.ndarray":
    """The 16-bit patterns of the code values in ``dtype`` (float16 or bfloat16), as uint32."""
    import numpy as np

    return np.asarray(np.asarray(values, np.float32).astype(jnp.dtype(dtype)).view(np.uint16), np.uint32)


def _table_consts_ptx(values, dtype) -> str:
    """PTX moves of the 16-bit table into L0..L3 (low bytes) and H0..H3 (high bytes): register i
    holds the byte of entries 4i..4i+3, the layout both prmt decoders index with 3-bit selectors."""
    bits = _table_bits(values, dtype)
    lo_b, hi_b = bits & 0xFF, bits >> 8
    word = lambda b, i: int(b[4 * i] | (b[4 * i + 1] << 8) | (b[4 * i + 2] << 16) | (b[4 * i + 3] << 24))
    return "".join(f" mov.b32 L{i}, {word(lo_b, i):#010x};\n mov.b32 H{i}, {word(hi_b, i):#010x};\n"
                   for i in range(4))


def _prmt_asm(values, nibble: str, dtype=jnp.float16) -> str:
    """PTX decoding 4 codes (one nibble of each of 4 packed bytes) to 4 16-bit table values.

    The 16-bit table (fp16 or bf16 bit patterns) is split into its low and high bytes, 4
    registers each (L0..L3, H0..H3). The 4 codes' low 3 bits become the 4 selector nibbles of
    ``prmt`` over an 8-byte half-table; their top bit picks the half through a byte mask that
    ``prmt``'s sign-replicate mode makes directly from the packed word (selectors 8..B copy
    the sign bit of byte 0..3); ``lop3`` merges the halves, and two more ``prmt`` interleave
    low and high bytes into 16-bit pairs. 14 instructions for 4 values (the first version,
    which built the mask and the selectors with ``and``/``or`` chains, took 18).
    """
    head = ("{\n .reg .b32 t, v, u, s, idx, msk, a, b, lo, hi, L0, L1, L2, L3, H0, H1, H2, H3;\n"
            + _table_consts_ptx(values, dtype))
    # one asm per nibble (Pallas lowers single-result inline asm only): outputs $0,$1, input $2.
    # u: byte 0 = c0 | c1 << 4, byte 2 = c2 | c3 << 4 (lop3 0xE4: (a & c) | (b & ~c)); prmt
    # gathers bytes 0 and 2 into 4 selector nibbles; msk byte k = 0xFF where code k >= 8.
    if nibble == "hi":  # code k in bits 8k+4..8k+7; its top bit is bit 7 of byte k
        body = (" shr.b32 t, $2, 4;\n shr.b32 v, $2, 8;\n lop3.b32 u, t, v, 0x0F0F0F0F, 0xE4;\n"
                " prmt.b32 msk, $2, 0, 0xBA98;\n")
    else:  # code k in bits 8k..8k+3; shifted left by 4 its top bit is bit 7 of byte k
        body = (" shr.b32 t, $2, 4;\n lop3.b32 u, $2, t, 0x0F0F0F0F, 0xE4;\n shl.b32 v, $2, 4;\n"
                " prmt.b32 msk, v, 0, 0xBA98;\n")
    body += """ prmt.b32 s, u, 0, 0x4420;
 and.b32 idx, s, 0x7777;
 prmt.b32 a, L0, L1, idx;
 prmt.b32 b, L2, L3, idx;
 lop3.b32 lo, a, b, msk, 0xD8;
 prmt.b32 a, H0, H1, idx;
 prmt.b32 b, H2, H3, idx;
 lop3.b32 hi, a, b, msk, 0xD8;
 prmt.b32 $0, lo, hi, 0x5140;
 prmt.b32 $1, lo, hi, 0x7362;
"""
    return head + body + "}"


def decode_prmt(p, values, dtype=jnp.float16):
    """(high-nibble, low-nibble) table values of a uint8 tile ``p`` in a 16-bit ``dtype``."""
    from jax.experimental.pallas import triton as pltriton

    out = jax.ShapeDtypeStruct(p.shape, jnp.dtype(dtype))
    hi, lo = (pltriton.elementwise_inline_asm(_prmt_asm(values, nib, dtype), args=[p], constraints="=r,=r,r",
                                              pack=4, result_shape_dtypes=[out])[0]
              for nib in ("hi", "lo"))
    return hi, lo


def decode16(p, values, dtype, interpret: bool = False):
    """(high-nibble, low-nibble) code values of a uint8 tile in x's 16-bit ``dtype``, unscaled.

    On the GPU the prmt PTX reads the table in ``dtype`` directly (no fp32 round trip); the
    interpreter emulates it with the select tree rounded to ``dtype`` (the same values).
    """
    if not interpret:
        return decode_prmt(p, values, dtype)
    c = p.astype(jnp.int32)
    return (decode_select((c >> 4) & 15, values).astype(dtype),
            decode_select(c & 15, values).astype(dtype))


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


def byte_scales(a, shape, half_block: int):
    """Each byte's block absmax for a ``shape`` [R, H] byte tile, from ``a`` [R, nb]."""
    rows, h = shape
    nb = a.shape[1]
    if nb == 1:
        return jnp.broadcast_to(a, shape)
    return jnp.broadcast_to(a[:, :, None], (rows, nb, half_block)).reshape(rows, h)


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


# --- one-row GEMV on the tensor cores: a warp's mma does the row sums of 8 quantization blocks ---
#
# Why: the row-sum GEMV spends ~9.6 instructions a weight (decode, widen to fp32, x unpack, FMUL +
# FADD, block sums) and is issue-bound at ~25 us for 4096 x 14336. An m16n8k16 ``mma`` takes one
# byte's two decoded codes as one bf16x2 register of its B fragment, so after the decode (3 a
# weight) the multiply-adds cost 1/32 of an instruction a weight.
#
# Layout contract (what the kernel's tile gives, see gemv_4bit): the weight tile is
# ``[rows, blocks, 4, 8]`` uint8 (a 64-weight block = 4 chunks of 8 bytes), which the Triton
# lowering lays out with 8-byte vectors and lanes ``(g, t) = (lane // 4, lane % 4)`` on
# (block, chunk): the 4 lanes of a group hold the 4 chunks of ONE block of one row. Per 4-byte
# word a lane feeds the x pairs of bytes 0..3 as the A fragment as they come (a0..a3: rows g,
# g+8, k 2t.., 2t+8..: no register moves) and its decoded bytes as B columns: {byte 0, byte 2}
# into one accumulator, {byte 1, byte 3} into another. Of each product only one diagonal
# element is wanted: Ca[g, g] (x of bytes 0, 2 times their codes, summed over the group's 4
# lanes) and Cb[g + 8, g] (bytes 1, 3); the other elements mix blocks and are dropped. Both sit
# in lane (g, g // 2), elements g % 2 and 2 + g % 2, a lane that holds a chunk of block g: it
# adds their sum times the block's scale into its chunk's first accumulator value (the others
# pass through), so the total over the tile is the matmul, as for any per-element value.
MMA_CHUNK = 8  # bytes (16 codes) a lane holds per block and asm call


# How the mma engine decodes a word of codes into x-ordered 16-bit pairs: "lut" (one shared-
# memory table read a byte, ``lut_base`` fills the table once a program) or "prmt" (byte
# permutes against the table in registers, 22 integer-ALU instructions a word; the previous
# version, kept to time the two side by side).
MMA_DECODE = "lut"

# The byte table: entry b (a packed byte) is the 32-bit pair (value of b's high nibble, value
# of its low nibble) in x's 16-bit dtype, i.e. exactly the B-fragment register of that byte.
# Each entry is stored LUT_COPIES times side by side (4 * LUT_COPIES bytes an entry) and lane l
# reads copy l % LUT_COPIES: with 32 copies a warp's 32 reads hit 32 different banks whatever
# bytes it decodes (no conflicts, 32 KB a program); fewer copies trade conflicts for a smaller
# table and a shorter fill.
LUT_ENTRIES = 256
LUT_COPIES = 32


def _ptx_half(dtype) -> str:
    """PTX's name of x's 16-bit dtype (mma and packed-arithmetic suffixes)."""
    return {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float16): "f16"}[jnp.dtype(dtype)]


def _lut_entry_bytes() -> int:
    if LUT_COPIES not in (4, 8, 16, 32):
        raise ValueError(f"LUT_COPIES must be 4, 8, 16 or 32, got {LUT_COPIES}")
    return 4 * LUT_COPIES


def lut_fill_asm(values, dtype, num_threads: int, *, base: str | None = None, tid: str | None = None) -> str:
    """PTX that declares the program's byte table in shared memory, fills it and waits for all
    threads: ``$0`` = the table's shared-memory address, ``$1`` an unused input.

    Run once per thread at the start of the kernel (a one-element tile, which every thread
    holds); the decode asm takes ``$0`` as an operand, which orders it after the barrier.
    Thread ``tid`` builds entries ``tid + s * num_threads`` from the 16 table values (byte
    permutes over the L/H half-tables). The stores must not conflict: a first version let each
    thread write its own entry's 128 bytes, so a warp's lanes, 128 bytes apart, all hit the same
    4 banks (32-way conflicts: the fill cost more than the decode saved). Here each store
    instruction writes 512 contiguous bytes a warp (whole entries): lane l stores 16 bytes of
    the entry ``i * (32 / lanes_per_entry) + l // lanes_per_entry`` of its warp's 32, fetched
    from that entry's lane with a shuffle.

    With ``base`` and ``tid`` (PTX operands: the address of a table the caller allocated, and the
    thread's index among the ``num_threads`` that fill it) the PTX declares no array, returns
    nothing and ends without a barrier: the caller synchronizes its fillers (the Mosaic GPU
    kernel, whose barriers are its own).
    """
    if num_threads < 32 or LUT_ENTRIES % num_threads:
        raise ValueError(f"the table fill needs 32..{LUT_ENTRIES} threads dividing {LUT_ENTRIES}, got {num_threads}")
    entry = _lut_entry_bytes()
    lpe = entry // 16  # lanes storing one entry
    body = ""
    for s in range(LUT_ENTRIES // num_threads):
        body += f" add.u32 e, tid, {s * num_threads};\n shr.b32 ch, e, 4;\n and.b32 cl, e, 15;\n"
        for c, v in (("ch", "vh"), ("cl", "vl")):  # 16-bit value of code c: its two byte planes
            body += (f" setp.ge.u32 q, {c}, 8;\n and.b32 s, {c}, 7;\n"
                     " selp.b32 a, L2, L0, q;\n selp.b32 b, L3, L1, q;\n prmt.b32 lob, a, b, s;\n"
                     " selp.b32 a, H2, H0, q;\n selp.b32 b, H3, H1, q;\n prmt.b32 hib, a, b, s;\n"
                     f" prmt.b32 {v}, lob, hib, 0x0040;\n")
        # the high nibble's value in the low half (x's even element), the low nibble's above it
        body += " prmt.b32 pr, vh, vl, 0x5410;\n"
        for i in range(lpe):  # entries i * 32/lpe .. of the warp's 32: 512 contiguous bytes a store
            body += (f" add.u32 sl, lq, {i * (32 // lpe)};\n shfl.sync.idx.b32 v, pr, sl, 31, -1;\n"
                     f" st.shared.v4.b32 [wb+{s * num_threads * entry + 512 * i}], {{v, v, v, v}};\n")
    own = base is None
    decl = (" .shared .align 16 .b8 lowbit_lut[" + str(LUT_ENTRIES * entry) + "];\n") if own else ""
    return ("{\n" + decl +
            " .reg .b32 L0, L1, L2, L3, H0, H1, H2, H3, tid, e, ch, cl, s, a, b, lob, hib, vh, vl, pr, v;\n"
            " .reg .b32 base, ln, lq, sl, wb;\n"
            " .reg .pred q;\n" + _table_consts_ptx(values, dtype) +
            (" mov.u32 base, lowbit_lut;\n mov.u32 tid, %tid.x;\n" if own else f" mov.u32 base, {base};\n mov.u32 tid, {tid};\n") +
            " mov.u32 ln, %laneid;\n"
            f" shr.b32 lq, ln, {lpe.bit_length() - 1};\n"
            # this thread's store address: its warp's 32 entries, 16 bytes a lane
            f" shr.b32 wb, tid, 5;\n mad.lo.u32 wb, wb, {32 * entry}, base;\n mad.lo.u32 wb, ln, 16, wb;\n" + body +
            (" bar.sync 0;\n mov.b32 $0, base;\n}" if own else "}"))


def lut_base(values, dtype, num_threads: int, shape, interpret: bool = False):
    """int32 of the decode's tile ``shape``: the shared-memory address of the filled byte table
    (0 in the interpreter, whose decode does not read it). Call once, before the kernel's loop."""
    zero = jnp.zeros((1,), jnp.int32)
    if interpret:
        return jnp.zeros(shape, jnp.int32)
    from jax.experimental.pallas import triton as pltriton

    (base,) = pltriton.elementwise_inline_asm(lut_fill_asm(values, dtype, num_threads), args=[zero],
                                              constraints="=r,r", pack=1,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
    return jnp.broadcast_to(base.reshape((1,) * len(shape)), shape)


def _lut_lane_ptx(base: str) -> str:
    """PTX setting ``lb`` = this lane's copy of the table (``base`` + 4 * (lane % LUT_COPIES))."""
    wrap = f" and.b32 ln, ln, {LUT_COPIES - 1};\n" if LUT_COPIES < 32 else ""
    return f" mov.u32 ln, %laneid;\n{wrap} mad.lo.u32 lb, ln, 4, {base};\n"


def _lut_read_ptx(w: str, j: int, dst: str) -> str:
    """PTX reading byte ``j`` of word ``w``'s table entry into ``dst``: a byte permute puts the
    byte in the low byte, one multiply-add makes it this lane's copy (``lb``), one shared-memory
    read (1 integer-ALU instruction; the FMA pipe takes the address, the load unit the read)."""
    return (f" prmt.b32 t, {w}, 0, 0x444{j};\n mad.lo.u32 t, t, {_lut_entry_bytes()}, lb;\n"
            f" ld.shared.u32 {dst}, [t];\n")


def lut_scaled_pairs_asm(dtype) -> str:
    """PTX for 4 packed bytes (one 32-bit word, ``$4``): ``$0..$3`` = each byte's (high-nibble,
    low-nibble) pair from the byte table, times the block's scale, in x's 16-bit dtype.

    ``$5..$8`` the scale (fp32 bits; the word's 4 bytes share one quantization block),
    ``$9..$12`` the table's address (``lut_base``). The scale is rounded to the dtype and
    multiplies both halves at once (one packed fma with -0.0, which sm_80 has for bf16 too): the
    product is rounded twice (code, then product) where the reference rounds once, within one
    unit in the last place of the 16-bit result.
    """
    ty = _ptx_half(dtype)
    body = "".join(_lut_read_ptx("$4", j, "v") + f" fma.rn.{ty}x2 ${j}, v, sp, nz;\n" for j in range(4))
    return ("{\n .reg .b32 t, v, lb, ln, sp, nz;\n .reg .f32 sc;\n" + _lut_lane_ptx("$9") + " mov.b32 sc, $5;\n"
            f" cvt.rn.{ty}x2.f32 sp, sc, sc;\n mov.b32 nz, 0x80008000;\n" + body + "}")


def decode_scaled(p, scale, base, values, dtype, interpret: bool = False):
    """(high-nibble, low-nibble) values of a uint8 tile ``p`` times ``scale`` (fp32 of p's shape,
    each byte's block absmax), rounded to x's 16-bit ``dtype`` and returned as fp32 (exact).

    On the GPU one shared-memory table read a byte (``lut_scaled_pairs_asm``; ``base`` is
    ``lut_base``'s address tile); the interpreter rounds the same way: the
    code to ``dtype``, the scale to ``dtype``, their product to ``dtype``.
    """
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        sbits = jax.lax.bitcast_convert_type(scale, jnp.int32)
        (pairs,) = pltriton.elementwise_inline_asm(
            lut_scaled_pairs_asm(dtype), args=[p, sbits, base], constraints=",".join(["=r"] * 4 + ["r"] * 9),
            pack=4, result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, jnp.int32)])  # asm results are signless
        return unpack_pairs(jax.lax.bitcast_convert_type(pairs, jnp.uint32), dtype)
    c = p.astype(jnp.int32)
    s = scale.astype(dtype).astype(jnp.float32)
    return tuple((decode_select(v, values).astype(dtype).astype(jnp.float32) * s).astype(dtype).astype(jnp.float32)
                 for v in (c >> 4, c & 15))


def _decode_pairs_ptx(w: str, out: tuple[str, str, str, str], method: str | None = None) -> str:
    """PTX decoding the 4 bytes of word ``w`` into 4 registers of 16-bit pairs (x's order).

    Register ``out[j]`` = (value of byte j's high nibble, value of its low nibble): elements
    2j and 2j+1 along K, like x's 32-bit pair j.

    "lut": ``_lut_read_ptx``, 1 integer-ALU instruction a byte.
    "prmt": the codes in memory order are the prmt selectors into the table's byte planes
    (L0..L3, H0..H3), their top bits become byte masks through prmt's sign-replicate mode, lop3
    merges the two 8-entry half-tables, and the two final prmt interleave low and high bytes and
    put each byte's high-nibble value first: 22 integer-ALU instructions for 8 codes.
    """
    if (method or MMA_DECODE) == "lut":
        return "".join(_lut_read_ptx(w, j, out[j]) for j in range(4))
    head = f""" shl.b32 v, {w}, 4;
 shr.b32 s23, {w}, 16;
 and.b32 i01, {w}, 0x7777;
 and.b32 i23, s23, 0x7777;
 prmt.b32 m01, {w}, v, 0x9D8C;
 prmt.b32 m23, {w}, v, 0xBFAE;
"""
    for idx, msk, first, second in (("i01", "m01", *out[:2]), ("i23", "m23", *out[2:])):
        for plane, name in (("L", "lo"), ("H", "hi")):  # each byte plane: two half-tables, merged
            head += (f" prmt.b32 a, {plane}0, {plane}1, {idx};\n prmt.b32 b, {plane}2, {plane}3, {idx};\n"
                     f" lop3.b32 {name}, a, b, {msk}, 0xD8;\n")
        # lookup byte 2j is byte j's low nibble, 2j+1 its high one: (high, low) into each pair
        head += f" prmt.b32 {first}, lo, hi, 0x4051;\n prmt.b32 {second}, lo, hi, 0x6273;\n"
    return head


def mma_rowsum_asm(values, dtype) -> str:
    """PTX for one lane's 8-byte chunk: ``acc[chunk's first value] += its block's dot * scale``.

    Operands (32-bit): $0..$7 the new accumulator values; $8, $9 the chunk's bytes 0-3 and 4-7;
    $10..$17 x's pairs for bytes 0..7; $18..$25 the block's scale (fp32 bits, 8 copies);
    $26..$33 the accumulator values; $34..$41 the byte table's address (``lut_base``'s tile, 8 copies;
    read by the "lut" decode only). Four mma, one fma; the other accumulator values pass
    through (ptxas drops those copies)."""
    consts = _table_consts_ptx(values, dtype) if MMA_DECODE == "prmt" else ""
    ty = _ptx_half(dtype)
    mma = f" mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 "
    body = _lut_lane_ptx("$34") if MMA_DECODE == "lut" else ""
    for i, w in enumerate(("$8", "$9")):
        xq = "{" + ", ".join(f"${10 + 4 * i + j}" for j in range(4)) + "}"
        pairs = tuple(f"P{4 * i + j}" for j in range(4))
        body += _decode_pairs_ptx(w, pairs)
        for acc, pair in (("a", f"{{{pairs[0]}, {pairs[2]}}}"), ("b", f"{{{pairs[1]}, {pairs[3]}}}")):
            regs = "{" + ", ".join(f"{acc}{j}" for j in range(4)) + "}"
            body += mma + f"{regs}, {xq}, {pair}, {regs};\n"
    init = "".join(f" mov.f32 {acc}{j}, 0f00000000;\n" for acc in "ab" for j in range(4))
    passthrough = "".join(f" mov.b32 ${i}, ${26 + i};\n" for i in range(1, 8))
    return ("{\n .reg .b32 L0, L1, L2, L3, H0, H1, H2, H3, t, v, s23, i01, i23, m01, m23, a, b, lo, hi, lb;\n"
            " .reg .b32 P0, P1, P2, P3, P4, P5, P6, P7, ln, g, h;\n"
            " .reg .f32 a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, f, sc, ac;\n"
            " .reg .pred po, pz;\n" + consts + init + body +
            # Ca[g, g] + Cb[g + 8, g]: elements g % 2 and 2 + g % 2 of lane (g, g // 2)
            """ add.f32 e0, a0, b2;
 add.f32 e1, a1, b3;
 mov.u32 ln, %laneid;
 shr.b32 g, ln, 2;
 and.b32 h, g, 1;
 setp.ne.u32 po, h, 0;
 selp.f32 f, e1, e0, po;
 shr.b32 h, g, 1;
 and.b32 t, ln, 3;
 setp.eq.u32 pz, t, h;
 selp.f32 f, f, 0f00000000, pz;
 mov.b32 sc, $18;
 mov.b32 ac, $26;
 fma.rn.f32 f, f, sc, ac;
 mov.b32 $0, f;
""" + passthrough + "}")


def mma_rowsum(w, x, scale, acc, values, dtype, base=None, interpret: bool = False):
    """``acc`` plus each block's dot product times its ``scale``, for a ``[rows, blocks, 4, 8]``
    uint8 weight tile.

    ``x``: uint32 of w's shape, x's 32-bit (even, odd) pair of 16-bit ``dtype`` values for each
    byte; ``scale``: fp32 of w's shape (the block's absmax, broadcast); ``acc``: int32 of w's
    shape, the bits of fp32 partial sums whose total over the tile is what matters (on the GPU a
    block's product lands in one element, see the layout contract above); ``base``: int32 of
    w's shape, the byte table's address (``lut_base``; the "lut" decode). The interpreter
    computes the same total with the select-tree decode rounded to ``dtype``.
    """
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        out = jax.ShapeDtypeStruct(w.shape, jnp.int32)  # Triton's asm results are signless
        sbits = jax.lax.bitcast_convert_type(scale, jnp.int32)
        if base is None:
            if MMA_DECODE == "lut":
                raise ValueError("the lut decode needs base= (lut_base, called once before the loop)")
            base = jnp.zeros(w.shape, jnp.int32)
        (res,) = pltriton.elementwise_inline_asm(mma_rowsum_asm(values, dtype), args=[w, x, sbits, acc, base],
                                                 constraints=",".join(["=r"] * 8 + ["r"] * 34),
                                                 pack=MMA_CHUNK, result_shape_dtypes=[out])
        return res
    c = w.astype(jnp.int32)
    hi = decode_select(c >> 4, values).astype(dtype).astype(jnp.float32)
    lo = decode_select(c & 15, values).astype(dtype).astype(jnp.float32)
    xe, xo = unpack_pairs(x, dtype)
    total = jax.lax.bitcast_convert_type(acc, jnp.float32) + (hi * xe + lo * xo) * scale
    return jax.lax.bitcast_convert_type(total, jnp.int32)


def unpack_pairs(u, dtype):
    """fp32 (even, odd) elements of uint32 pairs of 16-bit ``dtype`` values (bf16: a shift)."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
        return (jax.lax.bitcast_convert_type(u << 16, jnp.float32),
                jax.lax.bitcast_convert_type(u & jnp.uint32(0xFFFF0000), jnp.float32))
    xe = jax.lax.bitcast_convert_type((u & jnp.uint32(0xFFFF)).astype(jnp.uint16), jnp.float16)
    xo = jax.lax.bitcast_convert_type((u >> 16).astype(jnp.uint16), jnp.float16)
    return xe.astype(jnp.float32), xo.astype(jnp.float32)
