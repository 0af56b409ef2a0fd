"""LLM.int8: ``x @ W.T`` with int8 weights and outlier decomposition, frozen-weight backward.

Outlier handling under jit: the set of outlier columns is data-dependent, and jit needs static
shapes. The reference uses a dense column mask: the int8 part sees x with outlier columns
zeroed (exactly bitsandbytes' quantization of the rest), and the 16-bit part multiplies
``x * mask`` by the dequantized weight. That is exact to the algorithm for any number of
outliers; the GPU path may trade it for a static cap (see ``pallas_kernels``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowbit_jax import quant
from lowbit_jax.ops._grad import zero_cotangent

# bitsandbytes' int8_mm_dequant constant: 1 / 127**2 as float32.
_INV_127_SQ = 6.200124e-05


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
    """The jnp reference of bitsandbytes' ``Linear8bitLt`` forward (inference weights)."""
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


def _forward(x, w8, bias, threshold):
    # Kernel dispatch lives here (GPU -> pallas_kernels); the reference everywhere else.
    return matmul_int8_reference(x, w8, threshold, bias)


def _matmul_int8_impl(threshold):
    @jax.custom_vjp
    def f(x, w8, bias):
        return _forward(x, w8, bias, threshold)

    def fwd(x, w8, bias):
        return _forward(x, w8, bias, threshold), (w8, bias, jnp.zeros((0,), x.dtype))

    def bwd(res, g):
        w8, bias, x_proto = res
        w = quant.int8_vectorwise_dequant(w8.codes, w8.row_absmax).astype(g.dtype)
        gx = jnp.einsum("...n,nk->...k", g, w, preferred_element_type=jnp.float32).astype(x_proto.dtype)
        gb = None
        if bias is not None:
            gb = jnp.sum(g.astype(jnp.float32).reshape(-1, g.shape[-1]), axis=0).astype(bias.dtype)
        return gx, zero_cotangent(w8), gb

    f.defvjp(fwd, bwd)
    return f


_IMPLS: dict = {}


def matmul_int8(x, w8, threshold: float = 6.0, bias=None):
    """``x @ W.T (+ bias)`` for an LLM.int8 weight ``w8`` (``[out, in]``), bitsandbytes' algorithm.

    Columns of ``x`` with any ``|x| >= threshold`` go through a 16-bit matmul with the matching
    dequantized weight columns; the rest through row-wise int8 quantization of x and an int8
    matmul with int32 accumulation. ``threshold=0`` is the plain int8 path. Gradient: x and bias.
    """
    x = jnp.asarray(x)
    _check(x, w8)
    threshold = float(threshold)
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    impl = _IMPLS.get(threshold)
    if impl is None:
        impl = _IMPLS[threshold] = _matmul_int8_impl(threshold)
    return impl(x, w8, bias)
