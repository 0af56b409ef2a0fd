"""LLM.int8: ``x @ W.T`` with int8 weights and outlier decomposition, frozen-weight backward.

Outlier columns under jit. The set of outlier feature columns (any ``|x| >= threshold``) is
data-dependent; jit needs static shapes. Two schemes were possible:

* a dense mask: the 16-bit part multiplies ``x * mask`` [M, K] by the whole dequantized weight
  [N, K]. Exact for any number of outliers, but it is a full 16-bit GEMM plus a 16-bit copy of
  W in HBM: slower than plain bf16, which defeats the point.
* a static cap (used here): ``max_outliers`` (C, default 64) column indices are gathered with
  ``jnp.nonzero(mask, size=...)``; the 16-bit part is ``x[:, idx] @ dequant(CB[:, idx]).T``, a
  [M, C] x [C, N] product against a gathered [N, C] slice of W, which costs ~C/K of a GEMM
  and runs as one more tensor-core dot inside the int8 kernel's epilogue (no [M, N] round trip).
  Unused slots are masked to zero, so whenever ``#outliers <= C`` the result is exactly
  bitsandbytes' algorithm (same columns, same int8 codes, same dequantized weight columns).
  When the cap is exceeded the remaining outlier columns are still added exactly, just
  slower, never through a full 16-bit copy of W: on a GPU by the Pallas kernel itself, under
  an in-kernel branch on the count (chunks of 64 columns gathered from x and the W tile); in
  XLA by a ``lax.cond`` and ``lax.while_loop`` into an fp32 [M, N] term. The GPU path used the
  XLA ``lax.cond`` first: its predicate is copied to the host, which stalled the stream ~80 us
  a layer on an H100.

Small M (<= SMALL_MAX_M) uses neither: the product is bandwidth-bound on W, so x's outlier
columns are multiplied against every W tile that is loaded anyway, as int8 too, and no weight
element is ever dequantized. Any number of outliers, no gather, no ``lax.cond`` (whose
predicate copy to the host stalled the GPU stream ~80 us a layer), no 16-bit copy of W. The
outlier columns become int8 digits of x:

* one digit (the default, ``int8_gemm.fold_one_digit``): ``x ~= s1 d1 + t r`` where ``t`` is
  the row's own int8 step and ``r`` sits in the codes row, whose outlier columns are zero; ``d1``
  is searched so the residual lands near a multiple of ``t``. One more row of int8 codes per
  row of x: ``pallas_kernels.int8_gemv`` (from GEMV_MIN_M rows on a GPU) runs both dots
  against each W tile and the epilogue in one launch; XLA (``impl="xla"``, fewer rows) stacks
  them as 2M rows of one int8 dot, so the vendor GEMM still reads W once.
* two digits (``SMALL_DIGITS = 2`` for the XLA dot, and the split-K kernel):
  ``x ~= s1 d1 + s2 d2``, error <= 1/64516 of the row's largest outlier, 3M rows.

This is not bitsandbytes' rounding: bitsandbytes rounds the dequantized weight columns
``CB * SCB / 127`` to x's 16-bit dtype (2^-9 relative for bf16) and keeps x's outliers as they
are; here the weight keeps its int8 precision and x's outlier columns are approximated as
above. On bitsandbytes' own inputs the error vs fp32 is at or below bitsandbytes' (RESULTS.md).
A first version did bitsandbytes' exact rounding in registers (every W tile dequantized to 16
bits, one 16-bit dot): 39.2 us against 26.4 us for the int8 dot alone at M=16 on an H100.

The trade-off: C bounds the fast path's extra work (gather N*C bytes, an M*C*N 16-bit GEMM);
LLM.int8's own measurements put outlier features at a handful of columns per layer, so 64 is
generous; raise it if a model routinely has more.

Rounding: the int8 part is exact integer arithmetic with bitsandbytes' scales. The kernels
then add the int8 part, the outlier product (a 16-bit dot in the same kernel's epilogue, fp32
accumulation) and bias in fp32 and cast once; bitsandbytes casts
the int8 part to the output dtype first and adds the outlier product in that dtype. Results
therefore differ from bitsandbytes by at most a couple of output-dtype roundings.

On a GPU the int8 part runs in ``pallas_kernels.int8_gemm`` (int8 tensor cores, fused
epilogue adding the outlier part and bias; a split-K variant for M <= 16); elsewhere in XLA.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from lowbit_jax import _compat, quant
from lowbit_jax.ops._grad import zero_cotangent
from pallas_kernels import int8_gemm, int8_gemv

# bitsandbytes' int8_mm_dequant constant: 1 / 127**2 as float32.
_INV_127_SQ = 6.200124e-05
MAX_OUTLIERS = 64
IMPLS = ("auto", "reference", "xla", "pallas", "pallas_interpret")

# Launch configs per regime (rows of x), measured on an H100 (benchmarks/RESULTS.md).
GPU_CONFIG = {
    "small": dict(block_m=16, block_n=64, block_k=256, splits=4, num_warps=4, num_stages=4),
    "medium": dict(block_m=128, block_n=128, block_k=128, splits=1, num_warps=8, num_stages=4),
    # 128x256 tiles: 461 vs 537 us at M=4096 thr 0, 505 vs 574 at thr 6; 52.6 vs 55.3 at M=256,
    # but 50.5 vs 41.6 at M=128 (N=14336, H100 sweeps 12:49 and 13:01 UTC)
    "large": dict(block_m=128, block_n=256, block_k=128, splits=1, num_warps=8, num_stages=3),
    # M <= SMALL_MAX_M with SMALL_ENGINE == "gemv" (pallas_kernels.int8_gemv)
    "gemv": dict(block_n=64, block_k=256, num_warps=4, num_stages=3),
}
SMALL_MAX_M = 16
LARGE_MIN_M = 256  # rows from which the wide tiles leave enough programs for 132 SMs
# Which int8 product runs rows <= SMALL_MAX_M on a GPU: "gemv" (pallas_kernels.int8_gemv: one
# launch, the epilogue fused, from GEMV_MIN_M rows; fewer take "xla"), "xla" (the vendor int8
# GEMM over codes and outlier digits stacked as rows of one dot, then a separate epilogue) or
# "pallas" (the split-K kernel). H100, N=14336, threshold 6 (RESULTS.md, seventh session): M=16
# gemv 24.6 / xla 25.4 / split-K 31.6 us; M=12 25.2 / 25.6; M=8 25.1 / 24.7; M=1 25.0 / 22.9.
SMALL_ENGINE = "gemv"
GEMV_MIN_M = 12  # between the measured M=8 (xla faster) and M=12 (gemv faster)
# Operand order of that XLA int8 dot when it stacks the outlier digits (threshold > 0; 3M rows):
# "wx" (the weight's rows as the GEMM's M side, the result transposed in the epilogue) or "xw".
# H100, M=16, thr 6: 27.04/27.00 vs 27.46/27.31 us; thr 0 (16 rows, always "xw") showed no
# gain (24.02/24.11 vs 23.80/24.27); M=1 equal (benchmarks/RESULTS.md, 2026-11-23 14:46 UTC).
SMALL_ORIENT = "wx"
# Outlier digits of that XLA dot: 1 (``int8_gemm.fold_one_digit``: one digit row, the residual
# in the codes row, the digit searched so the residual lands near the row's int8 step; 2M rows)
# or 2 (two digit rows, 3M). On bitsandbytes' own inputs (M=16, thr 6) the error vs fp32 is
# 1.27411e-2 with one searched digit, 1.27413e-2 with two, bitsandbytes' 1.27442e-2; H100 M=16:
# 25.98-26.15 vs 26.55-26.65 us (interleaved, same run). The "gemv" engine always uses 1.
SMALL_DIGITS = 1


def _check(x, w8):
    if not isinstance(w8, quant.RowwiseInt8):
        raise ValueError(f"w8 must be a RowwiseInt8 (from quantize_int8), got {type(w8).__name__}")
    if len(w8.shape) != 2:
        raise ValueError(f"w8 must hold a 2-D weight [out, in], got shape {w8.shape}")
    if x.shape[-1] != w8.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's in-features ({w8.shape[1]})")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")


def matmul_int8_reference(x, w8, threshold: float = 6.0, bias=None):
    """The jnp reference of bitsandbytes' ``Linear8bitLt`` forward with a dense outlier mask.

    Materialises the dequantized W: the oracle for tests, not a production path.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    codes, row_absmax, outlier_cols = quant.int8_vectorwise_quant(x2, threshold=threshold)
    acc = jax.lax.dot_general(
        codes, w8.codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
    )
    out = acc.astype(jnp.float32) * (row_absmax[:, None] * w8.row_absmax[None, :]) * jnp.float32(_INV_127_SQ)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    out = out.astype(x.dtype)
    if threshold > 0.0:
        w_cols = (quant.int8_vectorwise_dequant(w8.codes, w8.row_absmax) * outlier_cols[None, :]).astype(x.dtype)
        sub_x = jnp.where(outlier_cols[None, :], x2, jnp.zeros((), x.dtype))
        out = out + jnp.einsum("mk,nk->mn", sub_x, w_cols, preferred_element_type=jnp.float32).astype(x.dtype)
    return out.reshape(*lead, w8.shape[0])


def _outlier_chunks(x2, w8, outlier_cols, max_outliers):
    """(chunk(c) -> (sub_x [M, C], sub_w [N, C]) in x's dtype, count, C, number of chunks,
    all outlier indices).

    All outlier indices come first (column order) from ``jnp.nonzero(size=...)``; slots past
    the count are masked to zero, so a chunk holding fewer than C real columns adds nothing.
    """
    k = x2.shape[1]
    cap = min(int(max_outliers), k)
    count = jnp.sum(outlier_cols.astype(jnp.int32))
    n_chunks = (k + cap - 1) // cap
    idx_all = jnp.nonzero(outlier_cols, size=n_chunks * cap, fill_value=0)[0].astype(jnp.int32)
    slot = jnp.arange(cap, dtype=jnp.int32)

    def chunk(c):
        idx = jax.lax.dynamic_slice(idx_all, (c * cap,), (cap,))
        valid = (c * cap + slot) < count
        sub_x = jnp.where(valid[None, :], jnp.take(x2, idx, axis=1), jnp.zeros((), x2.dtype))
        # bitsandbytes' subB: int8_vectorwise_dequant(CB[:, cols], SCB).to(A.dtype)
        sub_w = quant.int8_vectorwise_dequant(jnp.take(w8.codes, idx, axis=1), w8.row_absmax).astype(x2.dtype)
        return sub_x, sub_w

    return chunk, count, cap, n_chunks, idx_all


def outlier_part(x2, w8, outlier_cols, max_outliers, first_chunk=0):
    """fp32 ``x[:, cols] @ dequant(CB[:, cols]).T`` over the mask's columns, chunk by chunk.

    Chunks from ``first_chunk`` on run in a while_loop that stops at the last real outlier, so
    only as many chunks as there are outliers are computed. W is never expanded beyond N x C.
    """
    chunk, count, cap, _, _ = _outlier_chunks(x2, w8, outlier_cols, max_outliers)

    def cond(state):
        c, _ = state
        return c * cap < count

    def body(state):
        c, acc = state
        return c + 1, acc + int8_gemm.outlier_dot(*chunk(c))

    init = jnp.zeros((x2.shape[0], w8.shape[0]), jnp.float32)
    return jax.lax.while_loop(cond, body, (jnp.int32(first_chunk), init))[1]


def _regime(m: int) -> str:
    """GPU_CONFIG section for ``m`` rows of x."""
    return "small" if m <= SMALL_MAX_M else "medium" if m < LARGE_MIN_M else "large"


def _int8_part(codes, sx, w8, sub_x, sub_w, extra, bias, out_dtype, impl):
    if impl == "xla":  # XLA's int8 dot_general, the same epilogue arithmetic
        return int8_gemm.reference(codes, w8.codes, sx, w8.row_absmax, sub_x, sub_w, extra, bias, out_dtype)
    cfg = dict(GPU_CONFIG[_regime(codes.shape[0])])
    return int8_gemm.fused_matmul(codes, sx, w8.codes, w8.row_absmax, sub_x, sub_w, extra, bias,
                                  out_dtype=out_dtype, interpret=impl == "pallas_interpret", **cfg)


def _forward(x, w8, bias, threshold, max_outliers, impl):
    if impl == "reference":
        return matmul_int8_reference(x, w8, threshold, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    codes, sx, outlier_cols = quant.int8_vectorwise_quant(x2, threshold=threshold)
    small = x2.shape[0] <= SMALL_MAX_M
    engine = SMALL_ENGINE
    if engine == "gemv" and x2.shape[0] < GEMV_MIN_M:
        engine = "xla"
    if small and impl in ("pallas", "pallas_interpret") and engine == "gemv":
        # one launch: int8 dots against each weight tile and the epilogue (outliers: one digit row)
        digit = None
        if threshold > 0.0:
            codes, sx, digit = int8_gemm.fold_one_digit(x2, outlier_cols, codes, sx)
        out = int8_gemv.matmul(codes, sx, w8.codes, w8.row_absmax, digit, bias, out_dtype=x.dtype,
                               interpret=impl == "pallas_interpret", **GPU_CONFIG["gemv"])
        return out.reshape(*lead, w8.shape[0])
    if small and impl == "pallas" and engine == "xla":
        impl = "xla"
    if threshold == 0.0:
        out = _int8_part(codes, sx, w8, None, None, None, bias, x.dtype, impl)
    elif small and impl == "xla":
        # the same outlier digits as the Pallas split-K kernel below, as extra rows of one int8 dot
        if SMALL_DIGITS == 1:
            codes, sx, digits = int8_gemm.fold_one_digit(x2, outlier_cols, codes, sx)
        else:
            digits = int8_gemm.outlier_digits(x2, outlier_cols)
        out = int8_gemm.digits_reference(codes, sx, w8.codes, w8.row_absmax, digits, bias, x.dtype,
                                         orient=SMALL_ORIENT)
    elif small and GPU_CONFIG["small"]["splits"] > 1:
        # Small M: the split-K kernel is bandwidth-bound on W, so the outlier product is done
        # densely from the W tiles it already loads (x's outlier columns as two int8 digits,
        # two more int8 dots): no gather, no cap, no lax.cond (whose predicate copy to the
        # host stalled the GPU stream ~80 us a layer), any outlier count.
        out = int8_gemm.fused_matmul(codes, sx, w8.codes, w8.row_absmax, bias=bias,
                                     digits=int8_gemm.outlier_digits(x2, outlier_cols),
                                     out_dtype=x.dtype, interpret=impl == "pallas_interpret",
                                     **GPU_CONFIG["small"])
    else:
        chunk, count, cap, n_chunks, idx_all = _outlier_chunks(x2, w8, outlier_cols, max_outliers)
        sub_x, sub_w = chunk(0)  # fused into the int8 kernel's epilogue
        if impl != "xla":
            # columns past the cap: added by the kernel under an in-kernel branch on the count
            cfg = dict(GPU_CONFIG[_regime(x2.shape[0])])
            out = int8_gemm.fused_matmul(codes, sx, w8.codes, w8.row_absmax, sub_x, sub_w, None, bias,
                                         overflow=(x2, idx_all, count, cap), out_dtype=x.dtype,
                                         interpret=impl == "pallas_interpret", **cfg)
            return out.reshape(*lead, w8.shape[0])

        def fast():
            return _int8_part(codes, sx, w8, sub_x, sub_w, None, bias, x.dtype, impl)

        def overflow():  # more outlier columns than the cap: the rest as an additive fp32 term
            rest = outlier_part(x2, w8, outlier_cols, max_outliers, first_chunk=1)
            return _int8_part(codes, sx, w8, sub_x, sub_w, rest, bias, x.dtype, impl)

        out = fast() if n_chunks == 1 else jax.lax.cond(count > cap, overflow, fast)
    return out.reshape(*lead, w8.shape[0])


def _grad_x(g, w8, x_dtype):
    # dx = g @ W with W = CB * SCB / 127 folded into g's columns, so W is never expanded in HBM
    # (XLA fuses the int8 -> 16-bit convert into the GEMM's operand load).
    g2 = g.reshape(-1, g.shape[-1])
    gs = (g2.astype(jnp.float32) * (w8.row_absmax * jnp.float32(1.0 / 127.0))[None, :]).astype(g.dtype)
    dx = jnp.einsum("mn,nk->mk", gs, w8.codes.astype(g.dtype), preferred_element_type=jnp.float32)
    return dx.astype(x_dtype).reshape(*g.shape[:-1], w8.shape[1])


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _matmul_int8(x, w8, bias, threshold, max_outliers, impl):
    return _forward(x, w8, bias, threshold, max_outliers, impl)


def _fwd_res(x, w8, bias, threshold, max_outliers, impl):
    return _forward(x, w8, bias, threshold, max_outliers, impl), (w8, bias, jnp.zeros((0,), x.dtype))


def _bwd(threshold, max_outliers, impl, res, g):
    w8, bias, x_proto = res
    gx = _grad_x(g, w8, x_proto.dtype)
    gb = None
    if bias is not None:
        gb = jnp.sum(g.astype(jnp.float32).reshape(-1, g.shape[-1]), axis=0).astype(bias.dtype)
    return gx, zero_cotangent(w8), gb


_matmul_int8.defvjp(_fwd_res, _bwd)


def _resolve(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if _compat.on_gpu() else "xla"
    return impl


def matmul_int8(x, w8, threshold: float = 6.0, bias=None, *, max_outliers: int = MAX_OUTLIERS,
                impl: str = "auto"):
    """``x @ W.T (+ bias)`` for an LLM.int8 weight ``w8`` (``[out, in]``), bitsandbytes' algorithm.

    Columns of ``x`` with any ``|x| >= threshold`` go through a 16-bit matmul with the matching
    dequantized weight columns; the rest through row-wise int8 quantization of x and an int8
    matmul with int32 accumulation. ``threshold=0`` is the plain int8 path. Gradient: x and bias.

    ``max_outliers``: static cap on outlier columns for the fast gathered path (exact below it,
    chunked and slower above it; see the module docstring). ``impl``: "auto" (Pallas int8
    tensor-core kernel on a GPU, XLA's int8 dot elsewhere), "xla", "pallas",
    "pallas_interpret" (the kernel in Pallas' interpreter, for CPU tests), or "reference"
    (dense-mask oracle that materialises W).
    """
    x = jnp.asarray(x)
    _check(x, w8)
    threshold = float(threshold)
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if int(max_outliers) < 1:
        raise ValueError(f"max_outliers must be >= 1, got {max_outliers}")
    if bias is not None and tuple(jnp.shape(bias)) != (w8.shape[0],):
        raise ValueError(f"bias must have shape ({w8.shape[0]},), got {tuple(jnp.shape(bias))}")
    return _matmul_int8(x, w8, bias, threshold, int(max_outliers), _resolve(impl))
