"""lowbit-jax: bitsandbytes' low-bit weights, kernels and optimizers, natively in JAX/Flax.

The public API. Names resolve lazily (PEP 562) so ``import lowbit_jax`` stays cheap and the
optional layers (Flax modules, optimizers, converters) load only when used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    # formats
    "NF4_CODE": "lowbit_jax.formats",
    "FP4_CODE": "lowbit_jax.formats",
    "create_dynamic_map": "lowbit_jax.formats",
    "create_normal_map": "lowbit_jax.formats",
    "create_linear_map": "lowbit_jax.formats",
    "create_fp8_map": "lowbit_jax.formats",
    # quantized tensors
    "QuantizedTensor": "lowbit_jax.quant",
    "Packed4bit": "lowbit_jax.quant",
    "Blockwise8bit": "lowbit_jax.quant",
    "RowwiseInt8": "lowbit_jax.quant",
    "quantize_4bit": "lowbit_jax.quant",
    "dequantize_4bit": "lowbit_jax.quant",
    "quantize_blockwise": "lowbit_jax.quant",
    "dequantize_blockwise": "lowbit_jax.quant",
    "int8_vectorwise_quant": "lowbit_jax.quant",
    "int8_vectorwise_dequant": "lowbit_jax.quant",
    "quantize_int8": "lowbit_jax.quant",
    "dequantize_int8": "lowbit_jax.quant",
    "dequantize": "lowbit_jax.quant",
    "footprint": "lowbit_jax.quant",
    # ops
    "matmul_4bit": "lowbit_jax.ops",
    "matmul_int8": "lowbit_jax.ops",
    "quantized_linear": "lowbit_jax.ops",
    # 8-bit optimizers (optax)
    "adamw8bit": "lowbit_jax.optim",
    "adam8bit": "lowbit_jax.optim",
    "lion8bit": "lowbit_jax.optim",
    "ademamix8bit": "lowbit_jax.optim",
    "sgd8bit": "lowbit_jax.optim",
    "rmsprop8bit": "lowbit_jax.optim",
    "adagrad8bit": "lowbit_jax.optim",
    "scale_by_adam_8bit": "lowbit_jax.optim",
    # Flax layers and configuration
    "QuantConfig": "lowbit_jax.nn.config",
    "quantize_weight": "lowbit_jax.nn.config",
    "quantize_params": "lowbit_jax.nn.quantize",
    "memory_footprint": "lowbit_jax.nn.quantize",
    "QuantReport": "lowbit_jax.nn.quantize",
    "QuantDense": "lowbit_jax.nn.linen",
    "quant_context": "lowbit_jax.nn.linen",
    "QuantLinear": "lowbit_jax.nn.nnx",
    "quantize_model": "lowbit_jax.nn.nnx",
    "LoraConfig": "lowbit_jax.nn.lora",
    "add_lora": "lowbit_jax.nn.lora",
    "merge_lora": "lowbit_jax.nn.lora",
    "unmerge_lora": "lowbit_jax.nn.lora",
    "split_trainable": "lowbit_jax.nn.lora",
    "combine": "lowbit_jax.nn.lora",
    "trainable_mask": "lowbit_jax.nn.lora",
    "print_trainable_parameters": "lowbit_jax.nn.lora",
    "prepare_for_kbit_training": "lowbit_jax.nn.lora",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'lowbit_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
