"""Flax layers over quantized weights (Linen and NNX), LoRA/QLoRA, and QuantConfig.

Linen: ``lowbit_jax.nn.linen`` (QuantDense, quant_context); NNX: ``lowbit_jax.nn.nnx``
(QuantLinear, quantize_model, apply_lora). Both import Flax, so they load on first use.
"""

from lowbit_jax.nn.config import QuantConfig, quantize_weight
from lowbit_jax.nn.lora import (
    LoraConfig,
    add_lora,
    combine,
    merge_lora,
    prepare_for_kbit_training,
    print_trainable_parameters,
    split_trainable,
    trainable_mask,
    unmerge_lora,
)
from lowbit_jax.nn.quantize import QuantReport, memory_footprint, quantize_params

__all__ = [
    "QuantConfig",
    "quantize_weight",
    "LoraConfig",
    "add_lora",
    "combine",
    "merge_lora",
    "prepare_for_kbit_training",
    "print_trainable_parameters",
    "split_trainable",
    "trainable_mask",
    "unmerge_lora",
    "QuantReport",
    "memory_footprint",
    "quantize_params",
]
