"""QuantConfig: which layers to quantize and how -- the ``BitsAndBytesConfig`` of lowbit-jax."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax.numpy as jnp

from lowbit_jax import quant

# bitsandbytes/transformers keep these in 16 bits by default: embeddings and the LM head.
DEFAULT_SKIP_MODULES = ("embed_tokens", "embedding", "wte", "wpe", "lm_head", "embed_out")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to store linear weights.

    load_in_4bit / load_in_8bit: NF4/FP4 blockwise or LLM.int8 (exactly one may be set; neither
        means "keep full precision").
    quant_type: "nf4" or "fp4" (4-bit only). double_quant: quantize the absmax too (QLoRA's DQ).
    blocksize: 4-bit block size (64 as bitsandbytes). compute_dtype: the matmul's dtype.
    int8_threshold: LLM.int8 outlier threshold (0 = plain int8).
    skip_modules: module-path substrings never quantized (embeddings, LM head by default).
    include / exclude: regexes on the module path ("layers/3/mlp/down_proj"); a layer is
        quantized when it matches an include (default: all) and no exclude.
    min_size: layers with fewer weight elements stay unquantized.
    """

    load_in_4bit: bool = True
    load_in_8bit: bool = False
    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: Optional[str] = "bfloat16"
    int8_threshold: float = 6.0
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = 4096

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("QuantConfig: load_in_4bit and load_in_8bit are mutually exclusive")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"QuantConfig.quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in quant.BLOCKSIZES_4BIT:
            raise ValueError(f"QuantConfig.blocksize must be one of {quant.BLOCKSIZES_4BIT}, got {self.blocksize}")
        if self.int8_threshold < 0:
            raise ValueError(f"QuantConfig.int8_threshold must be >= 0, got {self.int8_threshold}")
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype).name)
        for name in ("skip_modules", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            else:
                object.__setattr__(self, name, tuple(value))

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def method(self) -> str:
        """'nf4', 'fp4', 'int8' or 'none'."""
        if self.load_in_4bit:
            return self.quant_type
        if self.load_in_8bit:
            return "int8"
        return "none"

    def should_quantize(self, path: str, size: int) -> bool:
        """Whether the linear weight at module ``path`` (with ``size`` elements) is quantized."""
        if not self.enabled or size < self.min_size:
            return False
        if any(s in path for s in self.skip_modules):
            return False
        if self.include and not any(re.search(p, path) for p in self.include):
            return False
        return not any(re.search(p, path) for p in self.exclude)


def quantize_weight(w_out_in, config: QuantConfig):
    """Quantize a linear weight given in PyTorch's ``[out, in]`` layout as ``config`` says."""
    if config.load_in_4bit:
        return quant.quantize_4bit(
            w_out_in, blocksize=config.blocksize, quant_type=config.quant_type, compress_statistics=config.double_quant
        )
    if config.load_in_8bit:
        # bitsandbytes' Int8Params quantizes the float16 copy of the weight; so do we, for the
        # same codes (and float16 is where LLM.int8's weights come from anyway).
        return quant.quantize_int8(jnp.asarray(w_out_in).astype(jnp.float16))
    return jnp.asarray(w_out_in)
