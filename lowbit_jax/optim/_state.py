"""One optimizer moment per parameter leaf: 8-bit blockwise, or fp32 for small leaves.

bitsandbytes keeps a moment of a tensor with ``min_8bit_size`` (4096) or more elements as uint8
codes under a dynamic map (signed for moments that change sign, unsigned for second moments)
with one fp32 absmax per block of 256; smaller tensors keep fp32 moments because the absmax and
the rounding would cost more than they save. The moments here are ``Blockwise8bit`` containers
(or plain arrays), so optimizer states are pytrees that jit, shard and save like parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import formats
from lowbit_jax.quant import Blockwise8bit, dequantize_blockwise, quantize_blockwise

# bitsandbytes' 8-bit optimizers always quantize their states in blocks of 256.
STATE_BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096


def state_code(signed: bool) -> np.ndarray:
    """The map a moment is stored under: bitsandbytes' ``name2qmap['dynamic'|'udynamic']``."""
    return formats.dynamic_map(signed)


def is_8bit(shape, min_8bit_size: int) -> bool:
    return int(np.prod(shape, dtype=np.int64)) >= min_8bit_size


def zeros_state(param, signed: bool, min_8bit_size: int):
    """A zero moment for ``param``: all-zero codes and absmax (bnb's init) or fp32 zeros."""
    shape = tuple(jnp.shape(param))
    if not is_8bit(shape, min_8bit_size):
        return jnp.zeros(shape, jnp.float32)
    n = int(np.prod(shape, dtype=np.int64))
    blocks = -(-n // STATE_BLOCKSIZE)
    return Blockwise8bit(
        codes=jnp.zeros(shape, jnp.uint8),
        absmax=jnp.zeros((blocks,), jnp.float32),
        code=jnp.asarray(state_code(signed)),
        shape=shape,
        dtype="float32",
        blocksize=STATE_BLOCKSIZE,
    )


def load(state) -> jax.Array:
    """The fp32 value of a moment (dequantized when 8-bit)."""
    if isinstance(state, Blockwise8bit):
        return dequantize_blockwise(state, jnp.float32)
    return state


def store(value: jax.Array, like):
    """``value`` (fp32) stored the way ``like`` is: requantized with fresh absmax, or as is."""
    if isinstance(like, Blockwise8bit):
        return quantize_blockwise(value, code=like.code, blocksize=like.blocksize)
    return value.astype(jnp.float32)


def is_moment(x) -> bool:
    """Leaf predicate for ``jax.tree.map`` over trees of moments."""
    return isinstance(x, Blockwise8bit)


def state_nbytes(tree) -> int:
    """Bytes of every array in a tree of moments (codes, absmax, the 1 KiB maps, fp32 moments)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
