"""One entry point for a linear layer whose kernel may be quantized.

Modules and models call this instead of choosing between dense, 4-bit and int8 themselves, so
numerics stay in ``ops`` (Flax modules hold parameters and call a functional core).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from lowbit_jax import quant
from lowbit_jax.ops.matmul_4bit import matmul_4bit
from lowbit_jax.ops.matmul_int8 import matmul_int8


class LayerKernel(NamedTuple):
    """Layer ``layer`` of a kernel stacked over layers (``[L, ...]`` leaves), not yet sliced:
    a 4-bit one is multiplied in place where the kernels can (``matmul_4bit(layer=)``)."""

    stacked: Any
    layer: Any


def quantized_linear(x, kernel, bias=None, *, int8_threshold: float = 6.0, compute_dtype=None):
    """``x @ kernel (+ bias)`` for a Flax-layout dense kernel ``[in, out]``, or ``x @ W.T`` for a
    quantized weight stored bitsandbytes-style ``[out, in]`` (Packed4bit or RowwiseInt8).

    ``compute_dtype`` casts x first (bitsandbytes' ``bnb_4bit_compute_dtype``); the result has
    the compute dtype. ``kernel`` may be a :class:`LayerKernel` (one layer of a stacked kernel).
    """
    x = jnp.asarray(x)
    if compute_dtype is not None:
        x = x.astype(compute_dtype)
    if isinstance(kernel, LayerKernel):
        if isinstance(kernel.stacked, quant.Packed4bit):
            return matmul_4bit(x, kernel.stacked, bias, layer=kernel.layer)
        kernel = quant.layer_slice(kernel.stacked, kernel.layer)
    if isinstance(kernel, quant.Packed4bit):
        return matmul_4bit(x, kernel, bias)
    if isinstance(kernel, quant.RowwiseInt8):
        return matmul_int8(x, kernel, int8_threshold, bias)
    if isinstance(kernel, quant.QuantizedTensor):
        raise ValueError(f"kernel of type {type(kernel).__name__} cannot be used as a linear weight")
    kernel = jnp.asarray(kernel)
    y = jnp.einsum("...k,kn->...n", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
