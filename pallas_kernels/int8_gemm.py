"""Int8 x int8 -> int32 GEMM on the tensor cores with LLM.int8's dequantizing epilogue fused.

``y = (codes_x @ codes_w.T) * sx[:, None] * sw[None, :] / 127^2 + sub_x @ sub_w.T + extra + bias``,
cast to the output dtype. ``codes_x`` [M, K] are x's row-wise int8 codes (outlier columns already zeroed),
``codes_w`` [N, K] the weight's (bitsandbytes' ``CB``), ``sx``/``sw`` their fp32 row absmax
(``SCA``/``SCB``). ``sub_x`` [M, C] / ``sub_w`` [N, C] are the outlier columns of x and the
matching dequantized weight columns (16-bit, C small): their product is one more tensor-core
dot in the epilogue; outlier columns past those C are added by the kernel itself under an
in-kernel branch on their count (``overflow``). ``extra`` [M, N] is an optional additive term.
The int32 accumulator lives in registers only: the epilogue
rescales it, adds the outlier product and bias, and writes the final dtype, so no int32 or
fp32 [M, N] tensor reaches HBM (bitsandbytes writes the int32 result, dequantizes it in a
second kernel, computes the outlier matmul in a third and adds it in a fourth).

Small M (decode, M <= 16) is bandwidth-bound on the int8 weight: there ``splits > 1`` cuts K
into chunks handled by separate programs (more programs than SMs, so the whole HBM bandwidth
is used), each writing exact int32 partials; the caller sums them (integer adds are exact)
and applies the same epilogue with :func:`epilogue`. There the outlier columns arrive as two
int8 digits of x (:func:`outlier_digits`) and cost two more int8 dots per W tile;
:func:`digits_reference` is the same product as one XLA int8 dot over stacked rows.

Launch config at the top, the jnp reference beside the kernel, the public wrapper at the
bottom. Imports only jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BM, BN, BK = 128, 128, 128
NUM_WARPS, NUM_STAGES = 8, 3
# bitsandbytes' int8_mm_dequant constant: 1 / 127**2 in float32.
INV_127_SQ = 6.200124e-05
# bitsandbytes' int8_vectorwise_dequant constant: 1 / 127 as it rounds it.
INV_127 = 7.874015718698502e-3


def int8_dot(codes_x, codes_w, orient="xw"):
    """int32 ``codes_x @ codes_w.T`` in XLA. ``orient="wx"`` asks for ``(codes_w @ codes_x.T).T``:
    the same integers, but XLA's GEMM then tiles the weight's N rows as its M side, which for
    a few rows of x is a different (GEMV-like) kernel choice."""
    dims = (((1,), (1,)), ((), ()))
    if orient == "wx":
        return jax.lax.dot_general(codes_w, codes_x, dims, preferred_element_type=jnp.int32).T
    if orient != "xw":
        raise ValueError(f"orient must be 'xw' or 'wx', got {orient!r}")
    return jax.lax.dot_general(codes_x, codes_w, dims, preferred_element_type=jnp.int32)


def reference(codes_x, codes_w, sx, sw, sub_x=None, sub_w=None, extra=None, bias=None,
              out_dtype=jnp.float32, orient="xw"):
    """The jnp oracle: the same arithmetic in XLA (int32 dot, fp32 epilogue, one final cast)."""
    acc = int8_dot(codes_x, codes_w, orient)
    return epilogue(acc, sx, sw, sub_x, sub_w, extra, bias, out_dtype)


def outlier_dot(sub_x, sub_w):
    """fp32 ``sub_x @ sub_w.T`` from 16-bit operands (products exact in fp32)."""
    if jax.default_backend() == "cpu":  # XLA:CPU lacks some 16-bit -> fp32 dots: same math in fp32
        sub_x, sub_w = sub_x.astype(jnp.float32), sub_w.astype(jnp.float32)
        return jax.lax.dot_general(sub_x, sub_w, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)
    return jax.lax.dot_general(sub_x, sub_w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def epilogue(acc, sx, sw, sub_x=None, sub_w=None, extra=None, bias=None, out_dtype=jnp.float32):
    """int32 [M, N] -> ``out_dtype``: rescale, add outlier product, extra and bias, cast once."""
    out = acc.astype(jnp.float32) * (sx.astype(jnp.float32)[:, None] * sw.astype(jnp.float32)[None, :])
    out = out * jnp.float32(INV_127_SQ)
    if sub_x is not None:
        out = out + outlier_dot(sub_x, sub_w)
    if extra is not None:
        out = out + extra.astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)[None, :]
    return out.astype(out_dtype)


OVERFLOW_CHUNK = 64  # outlier columns a step of the in-kernel overflow loop


def _overflow(out, x16_ref, w_ref, idx_ref, count_ref, sw, first: int):
    """Add the outlier columns past the first ``first`` (bitsandbytes' rounding of the weight
    columns) to ``out`` [bm, bn], chunk by chunk, gathering x's and W's columns in-kernel.

    Runs under an in-kernel branch on the outlier count, so a GPU never waits on the host for
    it (an XLA ``lax.cond`` copies its predicate to the host: ~80 us a layer on an H100). Rare
    and slower (pointer gathers), but exact for any number of outlier columns.
    """
    bm, bn = out.shape
    count = count_ref[0]
    rows_m = jax.lax.broadcasted_iota(jnp.int32, (bm, OVERFLOW_CHUNK), 0)
    rows_n = jax.lax.broadcasted_iota(jnp.int32, (bn, OVERFLOW_CHUNK), 0)
    slot = jax.lax.broadcasted_iota(jnp.int32, (1, OVERFLOW_CHUNK), 1)
    dims = (((1,), (1,)), ((), ()))

    def body(c, out):
        start = first + c * OVERFLOW_CHUNK
        idx = idx_ref[pl.ds(start, OVERFLOW_CHUNK)][None, :]
        valid = (start + slot) < count
        xs = x16_ref[rows_m, jnp.broadcast_to(idx, (bm, OVERFLOW_CHUNK))]
        xs = jnp.where(valid, xs, jnp.zeros((), xs.dtype))
        wc = w_ref[rows_n, jnp.broadcast_to(idx, (bn, OVERFLOW_CHUNK))]
        wd = ((wc.astype(jnp.float32) * sw[:, None]) * jnp.float32(INV_127)).astype(xs.dtype)
        return out + jax.lax.dot_general(xs, wd, dims, preferred_element_type=jnp.float32)

    n_chunks = (count - first + OVERFLOW_CHUNK - 1) // OVERFLOW_CHUNK
    return jax.lax.fori_loop(0, n_chunks, body, out)


def _kernel(x_ref, w_ref, *rest, block_k, n_ktiles, has_sub, has_extra, has_bias, fused, dense,
            overflow_from=None):
    rest = list(rest)
    sx_ref = sw_ref = extra_ref = bias_ref = subx_ref = subw_ref = None
    if dense:  # split-K; the outlier product from x's two int8 digits against the same W tile
        d1_ref, d2_ref, s1_ref, s2_ref, swd_ref, o_ref, of_ref = rest
        bm, bn = x_ref.shape[0], w_ref.shape[0]
        dims = (((1,), (1,)), ((), ()))

        def dbody(kb, carry):
            acc, acc1, acc2 = carry
            cols = pl.ds(kb * block_k, block_k)
            ws = w_ref[:, cols]
            acc = acc + jax.lax.dot_general(x_ref[:, cols], ws, dims, preferred_element_type=jnp.int32)
            acc1 = acc1 + jax.lax.dot_general(d1_ref[:, cols], ws, dims, preferred_element_type=jnp.int32)
            acc2 = acc2 + jax.lax.dot_general(d2_ref[:, cols], ws, dims, preferred_element_type=jnp.int32)
            return acc, acc1, acc2

        zero = jnp.zeros((bm, bn), jnp.int32)
        acc, acc1, acc2 = jax.lax.fori_loop(0, n_ktiles, dbody, (zero, zero, zero))
        outl = acc1.astype(jnp.float32) * s1_ref[...][:, None] + acc2.astype(jnp.float32) * s2_ref[...][:, None]
        o_ref[...] = acc.reshape(o_ref.shape)
        of_ref[...] = (outl * (swd_ref[...][None, :] * jnp.float32(INV_127))).reshape(of_ref.shape)
        return
    if fused:
        sx_ref, sw_ref = rest.pop(0), rest.pop(0)
        if has_sub:
            subx_ref, subw_ref = rest.pop(0), rest.pop(0)
        extra_ref = rest.pop(0) if has_extra else None
        bias_ref = rest.pop(0) if has_bias else None
        if overflow_from is not None:
            x16_ref, idx_ref, count_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    (o_ref,) = rest
    bm, bn = x_ref.shape[0], w_ref.shape[0]
    dims = (((1,), (1,)), ((), ()))

    def body(kb, acc):
        xs = x_ref[:, pl.ds(kb * block_k, block_k)]
        ws = w_ref[:, pl.ds(kb * block_k, block_k)]
        return acc + jax.lax.dot_general(xs, ws, dims, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, n_ktiles, body, jnp.zeros((bm, bn), jnp.int32))
    if not fused:
        o_ref[...] = acc.reshape(o_ref.shape)
        return
    out = acc.astype(jnp.float32) * (sx_ref[...][:, None] * sw_ref[...][None, :])
    out = out * jnp.float32(INV_127_SQ)
    if has_sub:  # the outlier columns: one 16-bit tensor-core dot over C columns
        out = out + jax.lax.dot_general(subx_ref[...], subw_ref[...], dims, preferred_element_type=jnp.float32)
    if overflow_from is not None:
        sw = sw_ref[...]
        out = jax.lax.cond(count_ref[0] > overflow_from,
                           lambda o: _overflow(o, x16_ref, w_ref, idx_ref, count_ref, sw, overflow_from),
                           lambda o: o, out)
    if has_extra:
        out = out + extra_ref[...].astype(jnp.float32)
    if has_bias:
        out = out + bias_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = out.astype(o_ref.dtype)


def check_codes(codes_x, codes_w):
    """(M, K, N) of int8 codes x [M, K] and W [N, K], or a ValueError naming what is wrong."""
    m, k = codes_x.shape
    if codes_x.dtype != jnp.int8 or codes_w.dtype != jnp.int8:
        raise ValueError(f"codes_x and codes_w must be int8, got {codes_x.dtype} and {codes_w.dtype}")
    if codes_w.ndim != 2 or codes_w.shape[1] != k:
        raise ValueError(f"codes_w must be [N, {k}] like codes_x's K, got {codes_w.shape}")
    return m, k, codes_w.shape[0]


def raw(codes_x, codes_w, sx=None, sw=None, sub_x=None, sub_w=None, extra=None, bias=None, *, digits=None,
        overflow=None,
        out_dtype=jnp.float32, block_m=BM, block_n=BN, block_k=BK, splits=1, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES, interpret=False):
    """The launch. Shapes must tile exactly (``fused_matmul`` pads):

    codes_x [M, K] int8, codes_w [N, K] int8; M % block_m == N % block_n == 0,
    K % (splits * block_k) == 0; sub_x [M, C], sub_w [N, C] 16-bit, C a multiple of 16. ``splits == 1``: fused epilogue, returns [M, N] ``out_dtype``.
    ``splits > 1``: returns exact int32 partials [splits, M, N] (no epilogue); with
    ``digits`` = (int8 [2, M, K], fp32 [2, M]) from :func:`outlier_digits` and ``sw`` also the
    fp32 partials [splits, M, N] of the outlier product, two more int8 dots against the W tile
    already loaded (no gather, no 16-bit copy of W, any outlier count).
    """
    m, k, n = check_codes(codes_x, codes_w)
    kc = k // splits
    if m % block_m or n % block_n or k % splits or kc % block_k:
        raise ValueError(f"untiled launch: M={m}, N={n}, K={k}, tiles {block_m}x{block_n}x{block_k}, splits {splits}")
    fused = splits == 1
    in_specs = [pl.BlockSpec((block_m, kc), lambda i, j, s: (i, s)),
                pl.BlockSpec((block_n, kc), lambda i, j, s: (j, s))]
    args = [codes_x, codes_w]
    if fused:
        if sx is None or sw is None:
            raise ValueError("sx and sw are required for the fused launch (splits == 1)")
        args += [sx.astype(jnp.float32), sw.astype(jnp.float32)]
        in_specs += [pl.BlockSpec((block_m,), lambda i, j, s: (i,)),
                     pl.BlockSpec((block_n,), lambda i, j, s: (j,))]
        if sub_x is not None:
            c = sub_x.shape[1]
            args += [sub_x, sub_w]
            in_specs += [pl.BlockSpec((block_m, c), lambda i, j, s: (i, 0)),
                         pl.BlockSpec((block_n, c), lambda i, j, s: (j, 0))]
        if extra is not None:
            args.append(extra)
            in_specs.append(pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j)))
        if bias is not None:
            args.append(bias)
            in_specs.append(pl.BlockSpec((block_n,), lambda i, j, s: (j,)))
        if overflow is not None:
            x16, idx_all, count, _ = overflow
            if x16.shape != (m, k) or idx_all.ndim != 1:
                raise ValueError(f"overflow needs x [M, K] = [{m}, {k}] and a 1-D index list")
            args += [x16, idx_all.astype(jnp.int32), jnp.reshape(count, (1,)).astype(jnp.int32)]
            in_specs += [pl.BlockSpec((block_m, k), lambda i, j, s: (i, 0)),
                         pl.BlockSpec((idx_all.shape[0],), lambda i, j, s: (0,)),
                         pl.BlockSpec((1,), lambda i, j, s: (0,))]
        out_shape = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype))
        out_spec = pl.BlockSpec((block_m, block_n), lambda i, j, s: (i, j))
    else:
        if extra is not None or bias is not None or sub_x is not None:
            raise ValueError("sub_x, extra and bias are added by the caller when splits > 1")
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.int32)
        out_spec = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j))
        if digits is not None:
            dig, dscale = digits
            if sw is None or dig.shape != (2, m, k) or dig.dtype != jnp.int8 or dscale.shape != (2, m):
                raise ValueError("digits must be (int8 [2, M, K], fp32 [2, M]) and need sw")
            # separate operands: integer-indexing a stacked ref does not lower in Triton
            dscale = dscale.astype(jnp.float32)
            args += [dig[0], dig[1], dscale[0], dscale[1], sw.astype(jnp.float32)]
            in_specs += [pl.BlockSpec((block_m, kc), lambda i, j, s: (i, s)),
                         pl.BlockSpec((block_m, kc), lambda i, j, s: (i, s)),
                         pl.BlockSpec((block_m,), lambda i, j, s: (i,)),
                         pl.BlockSpec((block_m,), lambda i, j, s: (i,)),
                         pl.BlockSpec((block_n,), lambda i, j, s: (j,))]
            out_shape = (out_shape, jax.ShapeDtypeStruct((splits, m, n), jnp.float32))
            out_spec = (out_spec, pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)))
    dense = (not fused) and digits is not None
    kernel = functools.partial(_kernel, block_k=block_k, n_ktiles=kc // block_k,
                               has_sub=sub_x is not None, has_extra=extra is not None, has_bias=bias is not None, fused=fused,
                               dense=dense, overflow_from=None if overflow is None else int(overflow[3]))
    params = None
    if not interpret:
        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(m // block_m, n // block_n, splits),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=params,
        interpret=interpret,
    )(*args)


def _fit(dim: int, cap: int, floor: int = 16) -> int:
    """The largest power of two in [floor, cap] dividing dim, else cap (the caller pads)."""
    b = cap
    while b >= floor:
        if dim % b == 0:
            return b
        b //= 2
    return cap


def _pad(a, axis, mult):
    pad = (-a.shape[axis]) % mult
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return jnp.pad(a, widths)


def outlier_digits(x, outlier_cols):
    """x's outlier columns (zero elsewhere) as two int8 digits per element and their row scales.

    ``x ~= s1 * d1 + s2 * d2`` with ``s1 = max|x_outliers| / 127`` per row and ``s2 = s1 / 254``:
    the error is at most ``s2 / 2``, 1/64516 of the row's largest outlier (finer than bf16's
    quantum for every element above 1/256 of that maximum). Returns (int8 [2, M, K], fp32 [2, M]).
    """
    xo = jnp.where(outlier_cols[None, :], x.astype(jnp.float32), jnp.float32(0.0))
    amax = jnp.max(jnp.abs(xo), axis=1)
    s1 = jnp.where(amax > 0, amax / jnp.float32(127.0), jnp.float32(1.0))
    d1 = jnp.clip(jnp.round(xo / s1[:, None]), -127, 127)
    s2 = s1 / jnp.float32(254.0)
    d2 = jnp.clip(jnp.round((xo - d1 * s1[:, None]) / s2[:, None]), -127, 127)
    return jnp.stack([d1, d2]).astype(jnp.int8), jnp.stack([s1, s2])


# Fractional part of the ratio between the digit's scale and the codes row's step: the golden
# ratio's, so the candidates' residuals a * s1 (mod the step) spread evenly (three-distance
# theorem) and one of them lands close to a multiple of the step whatever x is.
_GOLDEN_FRACTION = 0.6180339887
FOLD_WINDOW = 12  # candidates d1 = round(x / s1) + j, |j| <= FOLD_WINDOW


def fold_one_digit(x, outlier_cols, codes_x, sx, window: int | None = None):
    """One outlier digit instead of two: ``x ~= s1 d1 + t r`` on the outlier columns, where
    ``t = sx / 127`` is the codes row's own int8 step and ``r`` is stored in the codes row,
    whose outlier columns are zero (bitsandbytes' codes elsewhere are kept). The int8 dot then
    needs 2M rows instead of 3M.

    Why a search: with ``d1 = round(x / s1)`` alone the residual's rounding costs up to ``t / 2``
    an element, coarser than two digits. Both ``d1`` and ``r`` are free integers, so the
    representable values form a lattice ``{a s1 + b t}``. ``s1 / t`` is chosen with the golden
    ratio's fractional part (and ``s1 >= max|x_row| / 127``), so the 2W+1 candidates
    ``a = round(x / s1) + j`` leave residuals ``x - a s1`` whose positions between multiples of
    ``t`` are spread evenly; the candidate whose residual is nearest a multiple of ``t`` (with
    ``|b| <= 127``) wins, ties to the smallest ``|j|``. The error is typically ~t / (4W), a
    few times below the plain fold's, never above ``t / 2`` while ``max|x_row| <= 254 sx``
    (an outlier 254 times the row's other values; past that ``b`` saturates and the error
    grows toward one digit's ``s1 / 2``, 1/254 of the row's max). Rows whose other columns are
    all zero get the free codes-row scale ``max|x_row| / 127`` (``b`` is then a second digit).

    Returns (codes with the residual, sx to use in the epilogue, (d1 [1, M, K], s1 [1, M])).
    """
    window = FOLD_WINDOW if window is None else window
    xo = jnp.where(outlier_cols[None, :], x.astype(jnp.float32), jnp.float32(0.0))
    # the whole row's max bounds the outlier columns' max (all s1 needs) without waiting for
    # the column mask
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
    sx = sx.astype(jnp.float32)
    sx_eff = jnp.where(sx > 0, sx, amax / jnp.float32(127.0))
    t = jnp.where(sx_eff > 0, sx_eff / jnp.float32(127.0), jnp.float32(1.0))
    frac = jnp.float32(_GOLDEN_FRACTION)
    rho = jnp.ceil(amax / (jnp.float32(127.0) * t) - frac) + frac  # >= amax / (127 t), > 0
    s1 = rho * t
    xs = xo / s1[:, None]
    a0 = jnp.round(xs)
    best_a = a0
    best_b = jnp.zeros_like(xo)
    best_e = jnp.full_like(xo, jnp.inf)
    tc, sc = t[:, None], s1[:, None]
    for j in sorted(range(-window, window + 1), key=lambda j: (abs(j), j)):
        a = jnp.clip(a0 + j, -127.0, 127.0)
        r = xo - a * sc
        b = jnp.clip(jnp.round(r / tc), -127.0, 127.0)
        e = jnp.abs(r - b * tc)
        take = e < best_e
        best_a = jnp.where(take, a, best_a)
        best_b = jnp.where(take, b, best_b)
        best_e = jnp.where(take, e, best_e)
    codes = jnp.where(outlier_cols[None, :], best_b, codes_x.astype(jnp.float32)).astype(jnp.int8)
    d1 = jnp.where(outlier_cols[None, :], best_a, 0.0)
    return codes, sx_eff, (d1[None].astype(jnp.int8), s1[None])


def digits_reference(codes_x, sx, codes_w, sw, digits, bias=None, out_dtype=jnp.float32, orient="xw"):
    """The small-M product with outlier digits as ONE int8 dot in XLA: x's codes and its
    outlier digits (two: :func:`outlier_digits`, 3M rows; one: :func:`fold_one_digit`, 2M)
    stacked against the weight (the vendor int8 GEMM reads W once), then the epilogue:
    ``acc0 * sx * sw / 127^2 + (acc1 * s1 + acc2 * s2) * sw / 127 + bias``.
    (Zero rows padding the 3M to 64 measured no faster on an H100: RESULTS.md.)"""
    m = codes_x.shape[0]
    dig, dsc = digits
    stacked = jnp.concatenate([codes_x, *dig], axis=0)
    acc = int8_dot(stacked, codes_w, orient)
    sw32 = sw.astype(jnp.float32)
    outl = sum(acc[(i + 1) * m:(i + 2) * m].astype(jnp.float32) * dsc[i][:, None] for i in range(dig.shape[0]))
    extra = outl * (sw32[None, :] * jnp.float32(INV_127))
    return epilogue(acc[:m], sx, sw, extra=extra, bias=bias, out_dtype=out_dtype)


def fused_matmul(codes_x, sx, codes_w, sw, sub_x=None, sub_w=None, extra=None, bias=None, *, digits=None,
                 overflow=None,
                 out_dtype=jnp.float32, block_m=BM, block_n=BN, block_k=BK, splits=1, num_warps=NUM_WARPS,
                 num_stages=NUM_STAGES, interpret=False):
    """``(codes_x @ codes_w.T) * sx * sw / 127^2 + sub_x @ sub_w.T + extra + bias`` for any shapes.

    Tiles are shrunk to powers of two dividing N and K where possible; otherwise the operands
    are zero-padded (zero codes add nothing). M is always padded to the row tile, which is
    cheap (activations); padding N or K copies the weight, which real layer shapes
    (multiples of 128) never need. ``splits > 1`` is the small-M split-K path; there ``digits``
    (:func:`outlier_digits`) adds the outlier columns' product with the int8 weight scaled by
    ``sw / 127``, computed from the W tiles the int8 dot loads, for any number of outliers.
    ``overflow`` = (x [M, K] 16-bit, int32 outlier column indices in order (any length >= count),
    int32 count, first): with ``splits == 1``, the outlier columns from position ``first`` of
    the list on (those past ``sub_x``/``sub_w``) are added by the kernel itself under an
    in-kernel branch on ``count > first``.
    """
    m, k = codes_x.shape
    n = codes_w.shape[0]
    block_n = _fit(n, block_n)
    block_k = _fit(k // splits if k % splits == 0 else k, block_k)
    block_m = max(16, min(block_m, 1 << max(4, (m - 1).bit_length())))
    kmult = block_k * splits
    xp = _pad(_pad(codes_x, 0, block_m), 1, kmult)
    wp = _pad(_pad(codes_w, 0, block_n), 1, kmult)
    mp, np_ = xp.shape[0], wp.shape[0]
    sxp = _pad(sx.astype(jnp.float32), 0, block_m)
    swp = _pad(sw.astype(jnp.float32), 0, block_n)
    kw = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
              num_stages=num_stages, interpret=interpret)
    if splits > 1 and overflow is not None:
        raise ValueError("overflow is handled by the fused launch (splits == 1) only")
    if splits > 1:
        if digits is not None:
            dig = _pad(_pad(digits[0], 1, block_m), 2, kmult)
            dsc = _pad(digits[1], 1, block_m)
            parts, fparts = raw(xp, wp, None, swp, digits=(dig, dsc), splits=splits, **kw)
            dense = jnp.sum(fparts, axis=0)[:m, :n]
            extra = dense if extra is None else extra.astype(jnp.float32) + dense
        else:
            parts = raw(xp, wp, splits=splits, **kw)
        acc = jnp.sum(parts, axis=0)[:m, :n]
        return epilogue(acc, sx, sw, sub_x, sub_w, extra, bias, out_dtype)
    subxp = subwp = None
    if sub_x is not None:  # C to a multiple of 16 (tensor-core dot); zero columns add nothing
        subxp = _pad(_pad(sub_x, 0, block_m), 1, 16)
        subwp = _pad(_pad(sub_w, 0, block_n), 1, 16)
    ep = None if extra is None else _pad(_pad(extra, 0, block_m), 1, block_n)
    bp = None if bias is None else _pad(bias, 0, block_n)
    ovp = None
    if overflow is not None:  # (x [M, K] 16-bit, outlier indices, count, first column handled in-kernel)
        x16, idx_all, count, first = overflow
        idx_all = _pad(idx_all.astype(jnp.int32), 0, OVERFLOW_CHUNK)
        ovp = (_pad(_pad(x16, 0, block_m), 1, kmult), idx_all, count, first)
    out = raw(xp, wp, sxp, swp, subxp, subwp, ep, bp, out_dtype=out_dtype, overflow=ovp, **kw)
    if (mp, np_) != (m, n):
        out = out[:m, :n]
    return out
