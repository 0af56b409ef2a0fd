"""Flax/JAX decoders that run on plain or quantized parameter trees."""

from lowbit_jax.models.config import LlamaConfig
from lowbit_jax.models.llama import forward, init_cache, decode_step, init_params

__all__ = ["LlamaConfig", "forward", "init_cache", "decode_step", "init_params"]
