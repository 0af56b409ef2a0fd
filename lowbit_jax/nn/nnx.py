"""Flax NNX: ``QuantLinear``, in-place ``quantize_model``, and LoRA adapters (``LoRALinear``).

Quantized weights live in a ``QuantWeight`` variable, not ``nnx.Param``, so the usual filters
(``nnx.Param``, ``nnx.LoRAParam``) never hand their uint8 codes to ``jax.grad``; LoRA weights
are ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
``nnx.DiffState(0, nnx.LoRAParam)`` train exactly the adapters.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit_jax import quant
from lowbit_jax.nn.config import QuantConfig, quantize_weight
from lowbit_jax.nn.lora import LoraConfig, delta_weight, init_lora_weights, lora_delta, requantize_like
from lowbit_jax.nn.quantize import QuantReport, _keep_reason, _nbytes
from lowbit_jax.ops import quantized_linear


class QuantWeight(nnx.Variable):
    """A frozen quantized weight (a QuantizedTensor pytree)."""


def _value(v):
    return v.value if isinstance(v, nnx.Variable) else v


class QuantLinear(nnx.Module):
    """Drop-in for ``nnx.Linear``: ``kernel`` is a quantized ``[out, in]`` tensor (QuantWeight)
    or, when ``quant`` leaves it alone, a plain ``[in, out]`` ``nnx.Param``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Optional[Any] = None,
        param_dtype: Any = jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        bias_init=nnx.initializers.zeros_init(),
        quant: QuantConfig = QuantConfig(),
        rngs: nnx.Rngs,
        quantize: Optional[bool] = None,
    ):
        """``quantize``: force the decision (default: ``quant.should_quantize`` on the size)."""
        w = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        bias = bias_init(rngs.params(), (out_features,), param_dtype) if use_bias else None
        if quantize is None:
            quantize = quant.should_quantize("", int(np.prod(w.shape)))
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.quant = dtype, quant
        self.kernel = QuantWeight(quantize_weight(w.T, quant)) if quantize else nnx.Param(w)
        self.bias = nnx.Param(bias) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nnx.Linear, quant: QuantConfig, *, quantize: bool = True) -> "QuantLinear":
        """Quantize an existing ``nnx.Linear`` (its kernel ``[in, out]``)."""
        if not isinstance(linear, nnx.Linear):
            raise ValueError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
        kernel = linear.kernel.value
        bias = linear.bias.value if linear.bias is not None else None
        return cls(
            kernel.shape[0],
            kernel.shape[1],
            use_bias=bias is not None,
            dtype=linear.dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            quant=quant,
            rngs=nnx.Rngs(0),
            quantize=quantize,
        )

    def __call__(self, x):
        kernel = self.kernel.value
        bias = self.bias.value if self.bias is not None else None
        compute = self.dtype if self.dtype is not None else self.quant.compute_dtype
        if compute is None:
            compute = jnp.result_type(x.dtype, kernel.dtype)
        return quantized_linear(x, kernel, bias, int8_threshold=self.quant.int8_threshold, compute_dtype=compute)


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value):
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _linears(model, types):
    found = []
    for path, module in nnx.iter_modules(model):
        if path and isinstance(module, types):
            found.append((tuple(path), module))
    return found


def _replace(model, path, new):
    parent = model
    for key in path[:-1]:
        parent = _get(parent, key)
    _set(parent, path[-1], new)


def quantize_model(model: nnx.Module, config: QuantConfig) -> QuantReport:
    """Replace, in place, every ``nnx.Linear`` that ``config`` selects by a ``QuantLinear``."""
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    quantized, kept = [], []
    for path, lin in _linears(model, nnx.Linear):
        name = "/".join(str(p) for p in path)
        size = int(np.prod(lin.kernel.value.shape))
        if not config.should_quantize(name, size):
            kept.append((name, _keep_reason(name, size, config)))
            continue
        q = QuantLinear.from_linear(lin, config)
        quantized.append((name, config.method, _nbytes(lin.kernel.value), _nbytes(q.kernel.value)))
        _replace(model, path, q)
    return QuantReport(quantized, kept)


class LoRALinear(nnx.Module):
    """``base(x) + scale * dropout(x) @ A @ B`` around an ``nnx.Linear`` or ``QuantLinear``."""

    def __init__(self, base, config: LoraConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        kernel = base.kernel.value
        in_f, out_f = (kernel.shape[1], kernel.shape[0]) if isinstance(kernel, quant.QuantizedTensor) else kernel.shape
        a, b = init_lora_weights(rngs.params(), in_f, out_f, config.r, dtype)
        self.base = base
        self.lora_A = nnx.LoRAParam(a)
        self.lora_B = nnx.LoRAParam(b)
        self.scale = config.scale
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None
        self.merged = False
        self.saved_kernel = nnx.data(None)  # the quantized base while merged into bf16, for exact unmerge

    def __call__(self, x):
        y = self.base(x)
        if self.merged:
            return y
        xd = self.dropout(x) if self.dropout is not None else x
        return (y.astype(jnp.float32) + lora_delta(xd, self.lora_A.value, self.lora_B.value, self.scale)).astype(y.dtype)

    def _update_kernel(self, sign: float, requantize: bool, dtype):
        dw = sign * delta_weight(self.lora_A.value, self.lora_B.value, self.scale)
        k = self.base.kernel.value
        if isinstance(k, quant.QuantizedTensor):
            w = quant.dequantize(k, jnp.float32).T + dw
            if requantize:
                self.base.kernel = QuantWeight(requantize_like(w.T.astype(k.dtype), k))
            else:
                self.base.kernel = nnx.Param(w.astype(dtype))
        else:
            self.base.kernel = nnx.Param((k.astype(jnp.float32) + dw).astype(k.dtype))

    def merge(self, *, requantize: bool = False, dtype=jnp.bfloat16):
        """Fold the adapter into the base kernel (quantized bases: into ``dtype``, keeping the
        quantized original for an exact ``unmerge``, or requantized in place)."""
        if not self.merged:
            k = self.base.kernel
            if isinstance(k.value, quant.QuantizedTensor) and not requantize:
                self.saved_kernel = QuantWeight(k.value)
            self._update_kernel(1.0, requantize, dtype)
            self.merged = True

    def unmerge(self):
        """Take the adapter back out: restores a bf16-merged quantized base exactly; a
        requantized one is dequantized, unmerged and quantized again (not bit-exact)."""
        if self.merged:
            if self.saved_kernel is not None:
                self.base.kernel = self.saved_kernel
                self.saved_kernel = nnx.data(None)
            else:
                self._update_kernel(-1.0, True, None)
            self.merged = False


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> list[str]:
    """PEFT's ``get_peft_model`` in place: wrap each targeted Linear/QuantLinear in LoRALinear.

    Returns the adapted paths; raises ValueError when target_modules matches nothing.
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"config must be a LoraConfig, got {type(config).__name__}")
    candidates = [(p, m) for p, m in _linears(model, (nnx.Linear, QuantLinear))]
    inside_lora = {p for p, _ in _linears(model, LoRALinear)}
    done = []
    for path, lin in candidates:
        name = "/".join(str(p) for p in path)
        if path[:-1] in inside_lora or not config.matches(name):
            continue
        _replace(model, path, LoRALinear(lin, config, rngs=rngs))
        done.append(name)
    if not done:
        names = ["/".join(str(p) for p in path) for path, _ in candidates]
        raise ValueError(f"target_modules {config.target_modules!r} matched none of the linear layers {names}")
    return done


def merge_and_unload(model: nnx.Module, *, requantize: bool = False, dtype=jnp.bfloat16) -> nnx.Module:
    """Merge every adapter and put the (merged) base layers back in place of the LoRALinears."""
    for path, m in _linears(model, LoRALinear):
        m.merge(requantize=requantize, dtype=dtype)
        _replace(model, path, m.base)
    return model


def prepare_for_kbit_training(model: nnx.Module) -> nnx.Module:
    """Norm scales/biases and LoRA weights to float32, in place (compute stays in
    QuantConfig.compute_dtype); use ``nnx.remat`` on blocks for gradient checkpointing."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (nnx.LayerNorm, nnx.RMSNorm)):
            for name in ("scale", "bias"):
                v = getattr(m, name, None)
                if isinstance(v, nnx.Variable) and v.value is not None:
                    v.value = v.value.astype(jnp.float32)
        if isinstance(m, LoRALinear):
            m.lora_A.value = m.lora_A.value.astype(jnp.float32)
            m.lora_B.value = m.lora_B.value.astype(jnp.float32)
    return model
