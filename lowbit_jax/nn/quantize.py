"""Quantize an existing Linen params tree without touching the model code, and report it.

A "linear layer" is any dict holding a 2-D ``kernel`` (Flax's ``[in, out]``); its module path
is the dict's keys joined with "/" ("layers_0/attn/q_proj"), the string QuantConfig's
skip_modules / include / exclude rules see -- the same path an NNX model reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lowbit_jax import quant
from lowbit_jax.nn.config import QuantConfig, quantize_weight


def _is_linear(node) -> bool:
    if not isinstance(node, Mapping) or "kernel" not in node:
        return False
    k = node["kernel"]
    return isinstance(k, quant.QuantizedTensor) or (hasattr(k, "ndim") and k.ndim == 2)


def iter_linears(params, prefix: str = ""):
    """Yield ``(path, layer_dict)`` for every linear layer in a nested params dict."""
    if not isinstance(params, Mapping):
        return
    if _is_linear(params):
        yield prefix, params
        return
    for key, value in params.items():
        yield from iter_linears(value, f"{prefix}/{key}" if prefix else str(key))


def _nbytes(x) -> int:
    if isinstance(x, quant.QuantizedTensor):
        return x.nbytes
    return int(np.prod(np.shape(x), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass
class QuantReport:
    """Which linear layers were quantized (and how) and which were kept, with bytes saved."""

    quantized: list[tuple[str, str, int, int]]  # (path, method, bytes before, bytes after)
    kept: list[tuple[str, str]]  # (path, reason)

    @property
    def bytes_before(self) -> int:
        return sum(r[2] for r in self.quantized)

    @property
    def bytes_after(self) -> int:
        return sum(r[3] for r in self.quantized)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        width = max([len("layer")] + [len(r[0]) for r in self.quantized] + [len(r[0]) for r in self.kept])
        lines = [f"{'layer':<{width}}  {'method':<8} {'bytes before':>14} {'bytes after':>14}"]
        for path, method, before, after in self.quantized:
            lines.append(f"{path:<{width}}  {method:<8} {before:>14,} {after:>14,}")
        for path, reason in self.kept:
            lines.append(f"{path:<{width}}  {'kept':<8} ({reason})")
        lines.append(
            f"{len(self.quantized)} layers quantized, {len(self.kept)} kept; "
            f"{self.bytes_before:,} -> {self.bytes_after:,} bytes ({self.bytes_saved:,} saved)"
        )
        return "\n".join(lines)


def _keep_reason(path: str, size: int, config: QuantConfig) -> str:
    if not config.enabled:
        return "quantization disabled"
    if size < config.min_size:
        return f"size {size} < min_size {config.min_size}"
    if any(s in path for s in config.skip_modules):
        return "skip_modules"
    return "include/exclude rules"


def quantize_params(params, config: QuantConfig) -> tuple[Any, QuantReport]:
    """Return ``(new_params, report)``: every selected Dense kernel ``[in, out]`` replaced by a
    quantized tensor in bitsandbytes' ``[out, in]`` layout; everything else shared, untouched.

    Accepts ``{'params': ...}`` or the inner tree. Use the result with ``QuantDense`` models or
    with any ``nn.Dense`` model under ``lowbit_jax.nn.linen.quant_context()``.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    quantized, kept = [], []

    def walk(node, prefix):
        if _is_linear(node):
            k = node["kernel"]
            if isinstance(k, quant.QuantizedTensor):
                kept.append((prefix, "already quantized"))
                return node
            size = int(np.prod(k.shape))
            if not jnp.issubdtype(k.dtype, jnp.floating):
                kept.append((prefix, f"non-float kernel {k.dtype}"))
                return node
            if not config.should_quantize(prefix, size):
                kept.append((prefix, _keep_reason(prefix, size, config)))
                return node
            q = quantize_weight(jnp.asarray(k).T, config)
            quantized.append((prefix, config.method, _nbytes(k), _nbytes(q)))
            return {**node, "kernel": q}
        if isinstance(node, Mapping):
            return {key: walk(v, f"{prefix}/{key}" if prefix else str(key)) for key, v in node.items()}
        return node

    out = walk(params, "")
    return out, QuantReport(quantized, kept)


def memory_footprint(model_or_params) -> quant.Footprint:
    """Bytes of a model's weights (``get_memory_footprint``); ``str()`` is a per-leaf table.

    Takes a Linen params tree / variables dict, an NNX module, or any pytree.
    """
    try:
        from flax import nnx

        if isinstance(model_or_params, nnx.Module):
            model_or_params = nnx.state(model_or_params).to_pure_dict()
    except ImportError:  # pragma: no cover - flax is a dependency of nn
        pass
    return quant.footprint(model_or_params)


def dequantize_params(params, dtype=None):
    """The inverse view: quantized kernels back to Flax ``[in, out]`` arrays (for checks)."""
    def walk(node):
        if isinstance(node, Mapping):
            return {k: walk(v) for k, v in node.items()}
        return node

    out = walk(params)
    for _, layer in iter_linears(out):
        k = layer["kernel"]
        if isinstance(k, quant.QuantizedTensor):
            layer["kernel"] = quant.dequantize(k, dtype).T
    return out
