"""Quantized matmuls: the one place that chooses a kernel.

``matmul_4bit`` and ``matmul_int8`` compute ``x @ W.T`` for a weight stored as bitsandbytes
does (``W`` is ``[out, in]``). On a GPU they dispatch to ``pallas_kernels``; elsewhere they run
the jnp reference. Both are ``custom_vjp``s whose backward returns a gradient for ``x`` (and the
bias) only: the quantized base weight is frozen, which is what QLoRA needs.
"""

from lowbit_jax.ops.matmul_4bit import matmul_4bit, matmul_4bit_reference
from lowbit_jax.ops.matmul_int8 import matmul_int8, matmul_int8_reference
from lowbit_jax.ops.linear import LayerKernel, quantized_linear

__all__ = [
    "LayerKernel",
    "matmul_4bit",
    "matmul_4bit_reference",
    "matmul_int8",
    "matmul_int8_reference",
    "quantized_linear",
]
