"""Flax Linen: ``QuantDense`` and a context that runs plain ``nn.Dense`` models quantized + LoRA.

Modules hold parameters only; the numerics are ``lowbit_jax.ops.quantized_linear``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from lowbit_jax import quant
from lowbit_jax.nn.config import QuantConfig, quantize_weight
from lowbit_jax.nn.lora import LoraConfig, lora_delta
from lowbit_jax.ops import quantized_linear

default_kernel_init = nn.initializers.lecun_normal()


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.scope.path) if module.scope is not None else ""


class QuantDense(nn.Module):
    """Drop-in for ``nn.Dense`` whose ``kernel`` is a quantized tensor in bitsandbytes'
    ``[out, in]`` layout (or a plain ``[in, out]`` array when ``quant`` leaves the layer alone:
    skip_modules, min_size, or a fp tree loaded as is).

    From scratch, the initializer's ``[in, out]`` output is quantized; from an existing nn.Dense
    tree, run ``quantize_params`` on it first. ``dtype`` is the compute dtype (default
    ``quant.compute_dtype``).
    """

    features: int
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    quant: QuantConfig = QuantConfig()

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        size = in_features * self.features
        quantize = self.quant.should_quantize(_module_path(self), size)

        def init_kernel(rng):
            w = self.kernel_init(rng, (in_features, self.features), self.param_dtype)
            return quantize_weight(w.T, self.quant) if quantize else w

        if self.has_variable("params", "kernel"):
            # an existing tree: a quantized [out, in] kernel, or a plain [in, out] one that
            # quantize_params left alone (Flax's init-shape check would reject either)
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", init_kernel)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        if isinstance(kernel, quant.QuantizedTensor):
            if kernel.shape != (self.features, in_features):
                raise ValueError(
                    f"QuantDense {_module_path(self)!r}: kernel shape {kernel.shape} does not match "
                    f"[out, in] = {(self.features, in_features)}"
                )
        elif tuple(kernel.shape) != (in_features, self.features):
            raise ValueError(
                f"QuantDense {_module_path(self)!r}: kernel shape {tuple(kernel.shape)} does not match "
                f"[in, out] = {(in_features, self.features)}"
            )
        compute = self.dtype if self.dtype is not None else self.quant.compute_dtype
        if compute is None:
            compute = jnp.result_type(x.dtype, self.param_dtype)
        return quantized_linear(
            x, kernel, bias, int8_threshold=self.quant.int8_threshold, compute_dtype=compute
        )


def _dense_like(module) -> bool:
    return isinstance(module, (nn.Dense, QuantDense))


@contextlib.contextmanager
def quant_context(lora: Optional[LoraConfig] = None, *, deterministic: bool = True, compute_dtype=None):
    """Run any Linen model whose ``nn.Dense`` kernels ``quantize_params`` replaced, and add
    each layer's LoRA adapter (``lora_A``/``lora_B`` in its params) -- qwix-style, no model edits.

    ``deterministic=False`` applies LoRA dropout with the ``'dropout'`` rng stream.
    ``compute_dtype`` is the matmul dtype for quantized ``nn.Dense`` layers without a ``dtype``.
    """
    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"lora must be a LoraConfig or None, got {type(lora).__name__}")

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not _dense_like(module) or module.is_initializing():
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        variables = module.variables.get("params", {})
        kernel = variables.get("kernel")
        if isinstance(module, nn.Dense) and isinstance(kernel, quant.QuantizedTensor):
            compute = module.dtype or compute_dtype or kernel.dtype
            y = quantized_linear(x, kernel, variables.get("bias"), compute_dtype=compute)
        else:
            y = next_fun(*args, **kwargs)
        if lora is not None and "lora_A" in variables:
            rng = None
            if not deterministic and lora.dropout > 0.0:
                rng = module.make_rng("dropout")
            d = lora_delta(x, variables["lora_A"], variables["lora_B"], lora.scale, dropout=lora.dropout, rng=rng)
            y = (y.astype(jnp.float32) + d).astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        yield

