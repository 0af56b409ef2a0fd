"""Flax layers over quantized weights (Linen and NNX), LoRA/QLoRA, and QuantConfig."""

from lowbit_jax.nn.config import QuantConfig, quantize_weight

__all__ = ["QuantConfig", "quantize_weight"]
