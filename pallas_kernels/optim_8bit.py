"""Fused 8-bit Adam(W) step: one pass per 256-value block, states never leave registers in fp32.

Each program takes ``MAX_ROWS`` blocks of 256 values and reads p, g, the two moments' uint8 codes
and their fp32 absmax; it dequantizes (a gather from the 256-entry map), updates in fp32 with
bitsandbytes' formula, takes the fresh block absmax and requantizes with bitsandbytes' CPU
rounding rule (a 65536-bin lookup table, so codes are bit-identical to the jnp reference); it
writes p, codes and absmax back in place (``input_output_aliases``). 16 bytes a parameter move
(fp32 p: 4+4 read/write, g 4, codes 2+2, absmax ~0.03) against fp32 Adam's 28.

The maps and tables are gathered from global memory with array indexers, which Pallas' Triton
lowering turns into pointer loads. Those reads, not the 16 bytes, were the first cost: on the
H100 a step with both 64 KiB rounding-table reads and both 1 KiB map reads took 2.97 ms against
2.09 without any. The rounding ("logtable", the default) reproduces the 64 KiB table with one
gather a value from a ~8 KiB table of integer lines, one per coarse bin, the coarse bins
log-spaced around the center like the dynamic maps' codes (:func:`log_table`; exhaustively
equal to the table): 1.74-1.79 ms. Its predecessors found a linear piece by compare-selects
("segtable", 2.07 ms; "segments", 2.51 ms, ncu: 189 instructions a parameter, integer pipe 79%
busy). Beside the rounding, the instruction count (100 a parameter with "logtable", ncu) was cut
where the lowering spends more than the math needs: the update's square root and division and
the bin's float -> int convert as inline PTX on the GPU (``UPDATE_ASM``, ``CVT_ASM``), one
division a value (``UPDATE``), no clip before binning (``CLIP``), all-zero blocks to code 0
through bin 0 instead of a select a value.

Several leaves share one launch (:func:`adam8bit_leaves`): each launch ends in a partial wave
of programs, which cost 16 leaves of 4096x4096 ~4% and 64 leaves of 2048x2048 ~18% against one
leaf of the same size (H100, one launch a leaf). Programs are laid out leaf after leaf and branch to their leaf, so the
refs are whole arrays and each branch computes its own offsets (no per-leaf index maps
evaluated by every program).

Scalars arrive as a small fp32 vector (``HYPER_FIELDS``, one row a leaf) so learning-rate
schedules and injected hyperparameters stay traced values instead of recompiling the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK = 256  # bitsandbytes' state blocksize
# Blocks a program (1024 values, 4 a thread with 8 warps): 1.769-1.790 ms against 1.776-1.827
# for 8 blocks in three same-run sweeps on H100s (RESULTS.md); 8 blocks won before the
# instruction cuts below, and walking several chunks with the next loads carried lost (2.02 ms).
MAX_ROWS = 4
NUM_WARPS = 8
# The update's order: "one_div" (one division a value, within a few ulps of the update of
# bitsandbytes' CPU order, which the jnp reference keeps) or "two_div" (that order).
UPDATE = "one_div"
# Inline PTX on the GPU (the interpreter runs the jnp forms): the update's square root and
# division as approximate flush-to-zero ops (_adam_quotient), the bin's float -> int convert
# without the int32 range clamp (_truncate).
UPDATE_ASM = True
CVT_ASM = True
# Clip x / absmax to [-1, 1] before binning (bitsandbytes does). The clip cannot change a bin:
# |x| <= absmax (absmax is the row's own max), so |x * (1 / absmax)| exceeds 1 by a few ulps at
# most; (1 + 3 ulp + 1) * 32767.5 + 0.5 still truncates to bin 65535 and (-1 - 3 ulp + 1) *
# 32767.5 + 0.5 to bin 0, as the clipped values do. Off: two instructions a value less.
CLIP = False
LUT_SIZE = 65536
# default table reading, see _requantize: on the H100 "logtable" 1.74-1.79 ms a step, "segtable"
# 1.96-2.07, "segments" 2.27-2.51, "lut" 2.97 (268M fp32 params; benchmarks/RESULTS.md)
QUANTIZER = "logtable"
QUANTIZERS = ("lut", "bsearch", "segments", "segtable", "logtable")
# the roundings that take compile-time constants (``pieces``) beside their table
PIECEWISE = ("segments", "segtable", "logtable")
# How a program of a several-leaf launch finds its leaf: "tree" (nested two-way branches on its
# program id) or "switch" (lax.switch: Triton's lowering compares against every leaf in turn).
LEAF_SELECT = "tree"
SEG_SLOTS = 16  # pieces a map may have in the "segtable" layout (segment_table)
# order of the scalars in ``hyper``
HYPER_FIELDS = ("b1", "one_minus_b1", "b2", "one_minus_b2", "eps", "decay", "step_size", "correction2")


def rows_per_program(nblocks: int) -> int:
    """The largest power of two <= MAX_ROWS dividing ``nblocks`` (no ragged last program)."""
    rows = MAX_ROWS
    while nblocks % rows:
        rows //= 2
    return rows


def _dequantize(codes, absmax, code_ref):
    """fp32 values of a [rows, 256] block of codes: a gather from the 1 KiB map, times absmax."""
    return code_ref[codes.astype(jnp.int32)] * absmax[:, None]


def _lut_index(x, nonneg: bool = False, asm: bool = False):
    """Absmax of each row of ``x`` [rows, 256] and the lookup-table bin of every value.

    bitsandbytes' ``((clip(x / absmax) + 1) * 0.5) * 65535 + 0.5`` with the two multiplies as
    one by 32767.5: the same float32 result (``* 0.5`` is exact for the sum in [0, 2]), one
    instruction less. ``nonneg`` (the second moment): the lower clip cannot bind.
    """
    absmax = jnp.max(x if nonneg else jnp.abs(x), axis=1)
    zero = absmax == 0
    inv = jnp.float32(1.0) / jnp.where(zero, jnp.float32(1.0), absmax)
    normed = x * inv[:, None]
    if CLIP:  # bitsandbytes clips to [-1, 1]; see CLIP for why the bins are the same without it
        normed = jnp.minimum(normed, 1.0) if nonneg else jnp.clip(normed, -1.0, 1.0)
    # An all-zero block stores code 0 (bitsandbytes): its values are all 0, so adding 0 instead
    # of 1 puts them in bin 0, whose code is 0 in both state maps (checked by the table
    # builders' callers' tests), instead of a select on every value.
    one = jnp.where(zero, jnp.float32(0.0), jnp.float32(1.0))
    t = (normed + one[:, None]) * jnp.float32(0.5 * (LUT_SIZE - 1))
    idx = _truncate(t + jnp.float32(0.5), asm)
    return idx, absmax


def _truncate(x, asm: bool):
    """int32 ``trunc(x)`` for x in [0, 65536): the convert alone (one ``cvt.rzi``) on the GPU,
    where ``astype`` also clamps to the int32 range (two more instructions a value)."""
    if not asm:
        return x.astype(jnp.int32)
    return pltriton.elementwise_inline_asm("cvt.rzi.s32.f32 $0, $1;", args=[x], constraints="=r,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])[0]


def _adam_quotient(m, v, eps_c2, asm: bool):
    """``m / (sqrt(v) + eps_c2)``. On the GPU one PTX block of approximate flush-to-zero ops
    (one MUFU square root, an add, a MUFU reciprocal and a multiply: within 2 ulp), where the
    default lowering spends ~13 instructions a value on the denormal and range fix-ups of its
    square root and division."""
    if not asm:
        return m / (jnp.sqrt(v) + eps_c2)
    e = jnp.full(v.shape, eps_c2, jnp.float32)
    asm_text = "{ .reg .f32 s; sqrt.approx.ftz.f32 s, $2; add.ftz.f32 s, s, $3; div.approx.ftz.f32 $0, $1, s; }"
    return pltriton.elementwise_inline_asm(asm_text, args=[m, v, e], constraints="=f,f,f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])[0]


def _requantize(x, table_ref, quantizer: str, segments=None, nonneg: bool = False, asm: bool = False):
    """Codes and absmax of ``x`` [rows, 256] fp32 by bitsandbytes' CPU lookup-table rule.

    "lut": one gather from the 64 KiB table. "bsearch": the same answer as an 8-step binary
    search over the 256 bin thresholds where the code changes (``lut_thresholds``): eight
    gathers, but from 1 KiB, which a warp reads in far fewer cache lines. "segments": a
    piecewise-linear guess of the code from the bin (``lut_segments``: ~10 pieces, compile-time
    constants) corrected by one gather from the 1 KiB table of packed thresholds; "segtable"
    the same with the piece's constants gathered. "logtable": one gather of a coarse bin's
    integer line (``log_table``), no correction.
    """
    idx, absmax = _lut_index(x, nonneg, asm and CVT_ASM)
    if quantizer == "lut":
        codes = table_ref[idx]
    elif quantizer == "segments":
        codes = _segment_codes(idx, table_ref, segments)
    elif quantizer == "segtable":
        codes = _segtable_codes(idx, table_ref, segments)
    elif quantizer == "logtable":
        codes = _logtable_codes(idx, table_ref, segments)
    else:
        k = jnp.zeros(idx.shape, jnp.int32)
        for step in (128, 64, 32, 16, 8, 4, 2, 1):
            cand = k + step
            k = jnp.where(table_ref[cand] <= idx, cand, k)
        codes = k.astype(jnp.uint8)
    return codes, absmax


def lut_thresholds(lut):
    """int32 [256]: the first table bin whose code is >= k (65536 where none is)."""
    keys = jnp.arange(256, dtype=jnp.int32)
    # compare_all: no loop (a searchsorted loop costs a device round trip per step on GPU)
    return jnp.searchsorted(lut.astype(jnp.int32), keys, side="left", method="compare_all").astype(jnp.int32)


def lut_segments(lut: np.ndarray):
    """Pieces and packed thresholds that reproduce the rounding table ``lut`` without reading it.

    Returns ``(pieces, packed)``: ``pieces`` a tuple of (first bin, code there, slope) whose
    guess ``code + floor((bin - first) * slope)`` is within one of the table's code for every
    bin of the piece; ``packed`` int32 [256]: the first bin of code k in the low 16 bits and the
    bins until code k + 1 in the high 16, so one gather corrects the guess. The pieces are
    grown greedily and the result is checked against the table for all 65536 bins with the
    same float32 arithmetic the kernel runs (an exact multiply, a floor, integer adds), so the
    kernel's codes equal the table's by construction; a table this cannot reproduce raises.
    """
    lut = np.asarray(lut).astype(np.int64)
    if lut.shape != (LUT_SIZE,) or np.any(np.diff(lut) < 0):
        raise ValueError("lut must be a non-decreasing table of 65536 codes")
    first = np.searchsorted(lut, np.arange(257), side="left")  # first bin with code >= k
    first[0] = 0
    bins = np.arange(LUT_SIZE, dtype=np.int64)

    def guess(start, code, slope, x):
        g = code + np.floor((x - start).astype(np.float32) * np.float32(slope)).astype(np.int64)
        return np.clip(g, 0, 255)

    def corrected(g, x):
        return g - (x < first[g]) + (x >= first[g + 1])

    def fits(s, e):
        slope = np.float32((lut[e - 1] - lut[s]) / max(e - 1 - s, 1))
        x = bins[s:e]
        return np.array_equal(corrected(guess(s, lut[s], slope, x), x), lut[s:e]), slope

    pieces, s = [], 0
    while s < LUT_SIZE:
        lo, hi = s + 1, LUT_SIZE
        while lo < hi:  # the longest piece from s that fits (bisection on its end)
            mid = (lo + hi + 1) // 2
            if fits(s, mid)[0]:
                lo = mid
            else:
                hi = mid - 1
        ok, slope = fits(s, lo)
        if not ok:
            raise ValueError(f"rounding table cannot be split into pieces at bin {s}")
        pieces.append((int(s), int(lut[s]), float(slope)))
        s = lo
    gaps = first[1:] - first[:-1]
    if first[:256].max() > 0xFFFF or gaps.max() > 0xFFFF:
        raise ValueError("rounding table thresholds do not fit 16 bits")
    packed = (first[:256] | (gaps << 16)).astype(np.uint32).view(np.int32)
    # the check the kernel relies on, over every bin at once (per-bin constants, as it selects them)
    start, code, slope = (np.zeros(LUT_SIZE, np.int64), np.zeros(LUT_SIZE, np.int64), np.zeros(LUT_SIZE, np.float32))
    for p0, c0, sl in pieces:
        sel = bins >= p0
        start[sel], code[sel], slope[sel] = p0, c0, sl
    g = guess(start, code, slope, bins)
    if not np.array_equal(corrected(g, bins), lut):
        raise AssertionError("lut_segments does not reproduce the rounding table")
    return tuple(pieces), packed


def _segment_codes(idx, packed_ref, pieces):
    """The table's code for every bin in ``idx``: each piece's three constants picked with
    selects, the linear guess, then one 1 KiB gather of packed thresholds corrects it.
    (Evaluating every piece's guess and keeping the last that applies, one live array instead
    of three, measured slower on the H100: 3.18 vs 2.50 ms, benchmarks/KERNEL_NOTES.md.)"""
    start = jnp.full(idx.shape, pieces[0][0], jnp.int32)
    code = jnp.full(idx.shape, pieces[0][1], jnp.int32)
    slope = jnp.full(idx.shape, pieces[0][2], jnp.float32)
    for p0, c0, sl in pieces[1:]:
        sel = idx >= p0
        start = jnp.where(sel, jnp.int32(p0), start)
        code = jnp.where(sel, jnp.int32(c0), code)
        slope = jnp.where(sel, jnp.float32(sl), slope)
    return _corrected(code, start, slope, idx, packed_ref)


def _corrected(code, start, slope, idx, packed_ref):
    """The piece's linear guess, moved by at most one code with one gather of packed thresholds."""
    g = code + jnp.floor((idx - start).astype(jnp.float32) * slope).astype(jnp.int32)
    g = jnp.clip(g, 0, 255)
    packed = packed_ref[g]
    lo = packed & jnp.int32(0xFFFF)
    hi = lo + jax.lax.shift_right_logical(packed, jnp.int32(16))
    g = g - (idx < lo).astype(jnp.int32) + (idx >= hi).astype(jnp.int32)
    return g.astype(jnp.uint8)


def segment_table(pieces, packed) -> np.ndarray:
    """int32 [256 + 2 * SEG_SLOTS]: the packed thresholds, then each piece's ``start | code << 16``,
    then its slope's float32 bits, so "segtable" reads a piece's constants with two gathers
    from one 64-byte line instead of three selects a piece."""
    if len(pieces) > SEG_SLOTS:
        raise ValueError(f"{len(pieces)} pieces do not fit the {SEG_SLOTS} slots of the segment table")
    sc = np.zeros(SEG_SLOTS, np.int64)
    sl = np.zeros(SEG_SLOTS, np.float32)
    for j, (p0, c0, slope) in enumerate(pieces):
        sc[j], sl[j] = p0 | (c0 << 16), slope
    return np.concatenate([np.asarray(packed, np.int32), sc.astype(np.int32), sl.view(np.int32)])


def _segtable_codes(idx, table_ref, pieces):
    """As :func:`_segment_codes`, the piece found by one select a piece (its index), its
    constants gathered from the segment table (:func:`segment_table`)."""
    k = jnp.zeros(idx.shape, jnp.int32)
    for j, (p0, _, _) in enumerate(pieces[1:], start=1):
        k = jnp.where(idx >= p0, jnp.int32(j), k)
    sc = table_ref[k + 256]
    slope = jax.lax.bitcast_convert_type(table_ref[k + (256 + SEG_SLOTS)], jnp.float32)
    start = sc & jnp.int32(0xFFFF)
    code = jax.lax.shift_right_logical(sc, jnp.int32(16))
    return _corrected(code, start, slope, idx, table_ref)


LOG_CENTER = 32768  # the bin of a normalized 0 (t = 0.5)


def _log_coarse(a, mantissa_bits: int):
    """Coarse bin of the distance ``a`` >= 0 from the center bin: float32 exponent and top
    ``mantissa_bits`` of ``a`` (0 for a = 0, 1 for a = 1, ...). Coarse bins are narrow where
    the dynamic maps' codes are dense (near 0) and wide where they are sparse."""
    bias = (127 << mantissa_bits) - 1
    if isinstance(a, np.ndarray):
        bits = a.astype(np.float32).view(np.int32).astype(np.int64)
        return np.maximum((bits >> (23 - mantissa_bits)) - bias, 0)
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    return jnp.maximum(jax.lax.shift_right_arithmetic(bits, jnp.int32(23 - mantissa_bits)) - jnp.int32(bias), 0)


def _fit_lines(codes_by_distance, mantissa_bits: int, frac_bits: int):
    """Per coarse bin the integer line ``(A + a * B) >> frac_bits`` equal to the code at every
    distance ``a`` in it, or None where some coarse bin has none (its code steps too often)."""
    dist = np.arange(len(codes_by_distance), dtype=np.int64)
    coarse = _log_coarse(dist, mantissa_bits)
    ncoarse = int(coarse.max()) + 1
    lines = np.zeros((2, ncoarse), np.int64)
    for cb in range(ncoarse):
        sel = coarse == cb
        if not sel.any():
            continue
        a, want = dist[sel], codes_by_distance[sel]
        steps = np.nonzero(np.diff(want))[0]
        if len(steps) == 0:  # one code: a flat line
            lines[:, cb] = want[0] << frac_bits, 0
            continue
        if len(steps) == 1 and a[-1] - a[0] < (1 << frac_bits):  # one step: slope +-1, floor on it
            first = a[steps[0] + 1]
            up = int(want[-1] > want[0])
            lines[:, cb] = (max(want[0], want[-1]) << frac_bits) - (first if up else 1 - first), 1 if up else -1
            continue
        top = (abs(int(want[-1] - want[0])) + 2) * (1 << frac_bits) // max(1, len(a) - 1) + 2
        slopes = np.arange(-top, top + 1, dtype=np.int64)
        # A must satisfy want << F <= A + a B < (want + 1) << F at every a of the bin
        lo = ((want[None, :] << frac_bits) - a[None, :] * slopes[:, None]).max(1)
        hi = ((((want[None, :] + 1) << frac_bits) - 1) - a[None, :] * slopes[:, None]).min(1)
        ok = np.nonzero(lo <= hi)[0]
        if not len(ok):
            return None
        best = ok[np.argmin(np.abs(slopes[ok]))]
        lines[:, cb] = (lo[best] + hi[best]) // 2, slopes[best]
    return lines


def log_table(lut: np.ndarray):
    """One gather instead of the 64 KiB rounding table: ``(table, params)`` for "logtable".

    The bin's distance ``a = |bin - 32768|`` from the center picks a coarse bin by its float32
    exponent and top mantissa bits (:func:`_log_coarse`), one coarse table per side; the coarse
    bin's packed int32 entry holds an integer line (``A`` in the low ``abits`` bits, signed
    ``B`` above) whose ``(A + a * B) >> frac_bits`` IS the table's code: a coarse bin holds at
    most one code step and the line's floor is placed exactly on it. The search takes the
    smallest table that fits 32 bits a line, and the result is checked against the table for
    all 65536 bins with the kernel's integer arithmetic; a table it cannot reproduce raises.
    ``params`` = (mantissa_bits, frac_bits, abits, entries of the positive side).
    """
    lut = np.asarray(lut).astype(np.int64)
    if lut.shape != (LUT_SIZE,) or np.any(np.diff(lut) < 0):
        raise ValueError("lut must be a non-decreasing table of 65536 codes")
    pos, neg = lut[LOG_CENTER:], lut[LOG_CENTER::-1]
    for mbits in (4, 5, 6, 7, 8):
        for frac in range(8, 17):
            lp, ln = _fit_lines(pos, mbits, frac), _fit_lines(neg, mbits, frac)
            if lp is None or ln is None:
                continue
            a_, b_ = np.concatenate([lp[0], ln[0]]), np.concatenate([lp[1], ln[1]])
            abits = int(a_.max()).bit_length()
            if a_.min() < 0 or abits + int(np.abs(b_).max()).bit_length() + 1 > 32:
                continue
            packed = ((a_ | (b_ << abits)) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
            params = (mbits, frac, abits, lp.shape[1])
            if not np.array_equal(_logtable_codes_np(np.arange(LUT_SIZE), packed, params), lut):
                raise AssertionError("log_table does not reproduce the rounding table")
            return packed, params
    raise ValueError("rounding table cannot be reproduced by coarse log-spaced lines")


def _logtable_codes_np(idx, packed, params):
    """The kernel's arithmetic in numpy (int64 holds every int32 intermediate exactly)."""
    mbits, frac, abits, neg_offset = params
    u = idx.astype(np.int64) - LOG_CENTER
    a = np.abs(u)
    cb = _log_coarse(a, mbits) + np.where(u < 0, neg_offset, 0)
    entry = packed.astype(np.int64)[np.minimum(cb, len(packed) - 1)]
    return ((entry & ((1 << abits) - 1)) + a * (entry >> abits)) >> frac


def _logtable_codes(idx, table_ref, params):
    """The table's code for every bin in ``idx``: the coarse bin's line from one gather of the
    :func:`log_table` (one ~8 KiB table), a multiply-add and a shift; no correction needed."""
    mbits, frac, abits, neg_offset = params
    u = idx - jnp.int32(LOG_CENTER)
    a = jnp.abs(u)
    cb = _log_coarse(a, mbits) + jnp.where(u < 0, jnp.int32(neg_offset), jnp.int32(0))
    entry = table_ref[jnp.minimum(cb, jnp.int32(table_ref.shape[0] - 1))]
    line_a = entry & jnp.int32((1 << abits) - 1)
    line_b = jax.lax.shift_right_arithmetic(entry, jnp.int32(abits))
    return jax.lax.shift_right_arithmetic(line_a + a * line_b, jnp.int32(frac)).astype(jnp.uint8)


def _adam_leaf(hyper_ref, base: int, tables, ins, outs, *, block0, n: int, rows: int, quantizer: str,
               pieces1=None, pieces2=None, asm: bool = False):
    """One program's step on ``rows`` blocks of one leaf, from block ``block0`` on.

    ``hyper_ref[base:base + 8]`` are the leaf's scalars (``HYPER_FIELDS``); ``tables`` the two
    code maps and rounding tables; ``ins`` (p, g, codes1, absmax1, codes2, absmax2) and ``outs``
    (p, codes1, absmax1, codes2, absmax2) the leaf's whole [nblocks, 256] / [nblocks] refs,
    read and written at ``block0`` (offsets computed here, inside the leaf's branch).
    """
    code1_ref, code2_ref, lut1_ref, lut2_ref = tables
    p_ref, g_ref, c1_ref, a1_ref, c2_ref, a2_ref = ins
    p_out, c1_out, a1_out, c2_out, a2_out = outs
    b1, omb1, b2, omb2 = (hyper_ref[base + i] for i in range(4))
    eps, decay, step_size, correction2 = (hyper_ref[base + i] for i in range(4, 8))
    blk = pl.ds(block0, rows)

    g = g_ref[blk, :].astype(jnp.float32)
    p = p_ref[blk, :].astype(jnp.float32)
    m = _dequantize(c1_ref[blk, :], a1_ref[blk], code1_ref)
    v = _dequantize(c2_ref[blk, :], a2_ref[blk], code2_ref)
    if n % BLOCK:  # the padded tail of the last block must not enter its absmax
        flat = (block0 + jax.lax.broadcasted_iota(jnp.int32, (rows, BLOCK), 0)) * BLOCK
        valid = flat + jax.lax.broadcasted_iota(jnp.int32, (rows, BLOCK), 1) < n
        g = jnp.where(valid, g, 0.0)
        m = jnp.where(valid, m, 0.0)
        v = jnp.where(valid, v, 0.0)

    m = m * b1 + g * omb1
    v = v * b2 + (g * g) * omb2
    if UPDATE == "one_div":  # m / (sqrt(v) / c2 + eps) = c2 m / (sqrt(v) + c2 eps)
        p = p * decay + (step_size * correction2) * _adam_quotient(m, v, eps * correction2, asm and UPDATE_ASM)
    else:  # bitsandbytes' CPU order: two divisions a value
        denom = jnp.sqrt(v) / correction2 + eps
        p = p * decay + step_size * (m / denom)

    p_out[blk, :] = p.astype(p_out.dtype)
    c1, a1 = _requantize(m, lut1_ref, quantizer, pieces1, asm=asm)
    c2, a2 = _requantize(v, lut2_ref, quantizer, pieces2, nonneg=True, asm=asm)
    c1_out[blk, :] = c1
    a1_out[blk] = a1
    c2_out[blk, :] = c2
    a2_out[blk] = a2


def _adam_kernel(*refs, nleaves: int, ns, rows, firsts, **leaf_options):
    """Program ``i`` belongs to the leaf whose range of programs holds it (``firsts``: each
    leaf's first program): one branch a leaf, so a leaf's offsets and loads exist only there."""
    hyper_ref, tables = refs[0], refs[1:5]
    ins, outs = refs[5:5 + 6 * nleaves], refs[5 + 6 * nleaves:]
    pid = pl.program_id(0)

    def branch(j):
        def run():
            _adam_leaf(hyper_ref, 8 * j, tables, ins[6 * j:6 * j + 6], outs[5 * j:5 * j + 5],
                       block0=(pid - firsts[j]) * rows[j], n=ns[j], rows=rows[j], **leaf_options)
        return run

    if LEAF_SELECT == "switch":  # the lowering's chain: one compare a leaf before the right branch
        leaf = jnp.int32(0)
        for j in range(1, nleaves):
            leaf = leaf + (pid >= firsts[j]).astype(jnp.int32)
        jax.lax.switch(leaf, [branch(j) for j in range(nleaves)])
        return

    def tree(lo, hi):  # leaves lo..hi-1: log2(L) compares a program
        if hi - lo == 1:
            return branch(lo)
        mid = (lo + hi) // 2
        return lambda: jax.lax.cond(pid >= firsts[mid], tree(mid, hi), tree(lo, mid))

    tree(0, nleaves)()


def _tables(quantizer, lut1, lut2):
    if quantizer == "bsearch":
        return lut_thresholds(lut1), lut_thresholds(lut2)
    return lut1, lut2


@functools.partial(jax.jit, static_argnames=("ns", "interpret", "quantizer", "rows", "num_warps", "pieces"))
def adam8bit_leaves(hyper, leaves, code1, code2, lut1, lut2, *, ns, interpret: bool = False,
                    quantizer: str | None = None, rows=None, num_warps: int | None = None, pieces=None):
    """One fused Adam(W) step on several leaves in ONE launch; returns a list of
    (p, codes1, absmax1, codes2, absmax2), one a leaf.

    ``hyper`` [L, 8]: each leaf's scalars (``HYPER_FIELDS``; weight decay may differ a leaf).
    ``leaves``: L tuples (p, g, codes1, absmax1, codes2, absmax2) of [nblocks, 256] views and
    [nblocks] absmax; ``ns`` the real value counts (the rest of a leaf's last block is padding).
    Programs are laid out leaf after leaf and each program branches to its leaf: one launch
    instead of L saves the ramp-down of L - 1 partial last waves (H100, 268M parameters, 40 steps
    a call: one leaf 1.611 ms, 16 leaves in 16 launches 1.670, in one 1.613; RESULTS.md).
    ``rows``: blocks a program, an int for every leaf or None for ``rows_per_program`` of each.

    ``code1/2`` are the two 256-entry maps. ``lut1/2`` are the uint8 [65536] tables of the two
    maps (``quant._code_lut``); ``quantizer`` picks how the kernel reads them (see
    ``_requantize``), all giving the same codes. For "segments", ``lut1/2`` are instead the packed
    tables and ``pieces`` the two maps' pieces, both from :func:`lut_segments` (host constants:
    the pieces are compiled into the kernel); for "segtable" the :func:`segment_table` of those;
    for "logtable" (the default) the two maps' :func:`log_table` tables, with their params as
    ``pieces``.
    """
    quantizer = QUANTIZER if quantizer is None else quantizer
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
    if quantizer in PIECEWISE and (pieces is None or len(pieces) != 2):
        raise ValueError(f"quantizer={quantizer!r} needs pieces=(pieces1, pieces2): lut_segments' pieces "
                         "or log_table's params")
    nleaves = len(leaves)
    if nleaves < 1 or len(ns) != nleaves or hyper.shape != (nleaves, len(HYPER_FIELDS)):
        raise ValueError(f"need one n and one hyper row a leaf: {nleaves} leaves, {len(ns)} ns, hyper {hyper.shape}")
    leaf_rows, firsts, total = [], [], 0
    for j, leaf in enumerate(leaves):
        nblocks = leaf[0].shape[0]
        r = rows or rows_per_program(nblocks)
        if nblocks % r:
            raise ValueError(f"rows must divide the number of blocks of leaf {j} ({nblocks}), got {r}")
        leaf_rows.append(r)
        firsts.append(total)
        total += nblocks // r
    pieces1, pieces2 = pieces if quantizer in PIECEWISE else (None, None)
    kernel = functools.partial(_adam_kernel, nleaves=nleaves, ns=tuple(ns), rows=tuple(leaf_rows),
                               firsts=tuple(firsts), quantizer=quantizer, pieces1=pieces1, pieces2=pieces2,
                               asm=not interpret)
    extra = {}
    if not interpret:
        extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps or NUM_WARPS)
    flat_in = [x for leaf in leaves for x in leaf]
    out_shape = []
    aliases = {}
    for j, (p, _, codes1, absmax1, codes2, absmax2) in enumerate(leaves):
        out_shape += [jax.ShapeDtypeStruct(p.shape, p.dtype), jax.ShapeDtypeStruct(codes1.shape, jnp.uint8),
                      jax.ShapeDtypeStruct(absmax1.shape, jnp.float32), jax.ShapeDtypeStruct(codes2.shape, jnp.uint8),
                      jax.ShapeDtypeStruct(absmax2.shape, jnp.float32)]
        for k_in, k_out in zip((0, 2, 3, 4, 5), range(5)):
            aliases[5 + 6 * j + k_in] = 5 * j + k_out
    t1, t2 = _tables(quantizer, lut1, lut2)
    outs = pl.pallas_call(
        kernel,
        grid=(total,),
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        **extra,
    )(hyper.reshape(-1).astype(jnp.float32), code1, code2, t1, t2, *flat_in)
    return [tuple(outs[5 * j:5 * j + 5]) for j in range(nleaves)]
