"""``x @ W.T`` for a 4-bit (NF4/FP4) weight, with a frozen-weight backward."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from lowbit_jax import _compat, quant
from lowbit_jax.ops import _matmul_4bit_kernels as _kernels
from lowbit_jax.ops._grad import zero_cotangent


def _check(x, q):
    if not isinstance(q, quant.Packed4bit):
        raise ValueError(f"q must be a Packed4bit (from quantize_4bit), got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q must hold a 2-D weight [out, in], got shape {q.shape}")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal the weight's in-features ({q.shape[1]})")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")


def matmul_4bit_reference(x, q, bias=None):
    """The jnp reference: dequantize to x's dtype, then a dense matmul with fp32 accumulation.

    Materialises W; used on the CPU and as the oracle for the GPU kernels. fp32 x gets a
    full-precision dot (on a GPU XLA's default would use TF32 and differ from the kernels,
    which multiply fp32 at full precision, by ~3e-4 relative).
    """
    w = quant.dequantize_4bit(q, x.dtype)
    prec = jax.lax.Precision.HIGHEST if jnp.dtype(x.dtype) == jnp.dtype(jnp.float32) else None
    y = jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32, precision=prec)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


IMPLS = ("auto", "reference", "pallas", "pallas_interpret")


def _resolve(impl, q):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if (_compat.on_gpu() and _kernels.supported(q)) else "reference"
    if impl != "reference" and not _kernels.supported(q):
        raise ValueError(
            f"the 4-bit kernels need in-features ({q.shape[1]}) to be a multiple of the blocksize "
            f"({q.blocksize}); use impl='reference' (or 'auto') for this weight")
    return impl


def _forward(x, q, bias, impl, layer=None):
    if impl == "reference":
        return matmul_4bit_reference(x, q if layer is None else quant.layer_slice(q, layer), bias)
    return _kernels.forward(x, q, bias, interpret=impl == "pallas_interpret", layer=layer)


def _grad_x(g, q, x_dtype, impl):
    if impl == "reference":
        w = quant.dequantize_4bit(q, g.dtype)
        return jnp.einsum("...n,nk->...k", g, w, preferred_element_type=jnp.float32).astype(x_dtype)
    return _kernels.backward(g, q, interpret=impl == "pallas_interpret").astype(x_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul_4bit(x, q, bias, impl, layer):
    return _forward(x, q, bias, impl, layer)


def _fwd_res(x, q, bias, impl, layer):
    return _forward(x, q, bias, impl, layer), (q, bias, jnp.zeros((0,), x.dtype), layer)


def _bwd(impl, res, g):
    q, bias, x_proto, layer = res
    gx = _grad_x(g, q if layer is None else quant.layer_slice(q, layer), x_proto.dtype, impl)
    gb = None
    if bias is not None:
        gb = jnp.sum(g.astype(jnp.float32).reshape(-1, g.shape[-1]), axis=0).astype(bias.dtype)
    return gx, zero_cotangent(q), gb, None


_matmul_4bit.defvjp(_fwd_res, _bwd)


def matmul_4bit(x, q, bias=None, *, impl: str = "auto", layer=None):
    """``x @ W.T (+ bias)`` for ``W = dequantize_4bit(q)`` of shape ``[out, in]``.

    ``x`` is ``[..., in]`` in float32/bfloat16/float16; the result has x's dtype. The gradient
    flows to ``x`` and ``bias``, never to the quantized weight.

    ``impl``: "auto" runs the fused Pallas kernels on a GPU (GEMV for few rows, GEMM above the
    measured crossover; the backward is a transposed fused kernel, so W is never expanded in
    HBM) and the jnp reference elsewhere or when in-features are not a multiple of the
    blocksize. "reference", "pallas" and "pallas_interpret" (the kernels in Pallas' interpreter,
    for CPU tests) force one.

    ``layer``: ``q`` is a stacked weight (every array with a leading layer axis, as in a model's
    scanned layer tree) and the product is with layer ``layer`` (an int, may be traced). One
    row of 16-bit x reads that layer in place; other shapes slice it out first. In XLA a
    layer sliced out of a stack before a custom call is a copy of it: at batch-1 decode the
    copies took longer than the matmuls (benchmarks/RESULTS.md, decode profile).
    """
    x = jnp.asarray(x)
    _check(x, q)
    if layer is not None:
        per_layer = (q.shape[0] * q.shape[1] + 1) // 2  # bytes of one layer's codes
        layer_bytes = math.prod(q.packed.shape[1:]) * jnp.dtype(q.packed.dtype).itemsize
        if q.packed.ndim < 2 or layer_bytes != per_layer:  # what follows the leading axis is one layer
            raise ValueError(f"layer= needs a weight stacked over a leading layer axis, got packed "
                             f"{q.packed.shape} for a {q.shape} weight")
        layer = jnp.asarray(layer, jnp.int32)
    return _matmul_4bit(x, q, bias, _resolve(impl, q), layer)
