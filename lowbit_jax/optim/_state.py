"""One optimizer moment per parameter leaf: 8-bit blockwise, or fp32 for small leaves.

bitsandbytes keeps a moment of a tensor with ``min_8bit_size`` (4096) or more elements as uint8
codes under a dynamic map (signed for moments that change sign, unsigned for second moments)
with one fp32 absmax per block of 256; smaller tensors keep fp32 moments because the absmax and
the rounding would cost more than they save. The moments here are ``Blockwise8bit`` containers
(or plain arrays), so optimizer states are pytrees that jit, shard and save like parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import formats
from lowbit_jax.quant import _LUT_EDGES, _LUT_SIZE, Blockwise8bit, _block_absmax, dequantize_blockwise

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


@functools.lru_cache(maxsize=None)
def state_lut(signed: bool) -> np.ndarray:
    """uint8 [65536]: bitsandbytes' CPU rounding table for a state map, built once on the host.

    ``quantize_blockwise`` derives this table from its (traced) map on every call; a training
    step would rebuild it for every leaf (a searchsorted whose loop costs a device round trip
    per iteration on GPU, milliseconds a step). The state maps are fixed, so it is a constant.
    """
    code = state_code(signed).astype(np.float32)
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    lut = np.searchsorted(mids, _LUT_EDGES, side="left").astype(np.uint8)
    lut.setflags(write=False)
    return lut


@functools.lru_cache(maxsize=None)
def state_segments(signed: bool):
    """(pieces, packed thresholds) reproducing :func:`state_lut` for the fused kernel's
    gather-light rounding (``pallas_kernels.optim_8bit.lut_segments``), built once."""
    from pallas_kernels.optim_8bit import lut_segments

    pieces, packed = lut_segments(state_lut(signed))
    packed.setflags(write=False)
    return pieces, packed


@functools.lru_cache(maxsize=None)
def state_log_table(signed: bool):
    """(packed lines, params) reproducing :func:`state_lut` with one gather a value
    (``pallas_kernels.optim_8bit.log_table``), built and checked once."""
    from pallas_kernels.optim_8bit import log_table

    table, params = log_table(state_lut(signed))
    table.setflags(write=False)
    return table, params


def store(value: jax.Array, like, signed: bool):
    """``value`` (fp32) stored the way ``like`` is: requantized with fresh absmax, or as is.

    The codes are :func:`lowbit_jax.quant.quantize_blockwise`'s (same rule, same bits) with the
    rounding table taken from :func:`state_lut` instead of rebuilt.
    """
    if not isinstance(like, Blockwise8bit):
        return value.astype(jnp.float32)
    n = like.size
    blocks, absmax = _block_absmax(value.reshape(-1).astype(jnp.float32), like.blocksize)
    inv = jnp.float32(1.0) / jnp.where(absmax == 0, jnp.float32(1.0), absmax)
    normed = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
    t = (normed + jnp.float32(1.0)) * jnp.float32(0.5)
    idx = (t * jnp.float32(_LUT_SIZE - 1) + jnp.float32(0.5)).astype(jnp.int32)
    codes = jnp.take(jnp.asarray(state_lut(signed)), idx, axis=0)
    codes = jnp.where((absmax == 0)[:, None], jnp.uint8(0), codes)
    return like.replace(codes=codes.reshape(-1)[:n].reshape(like.shape), absmax=absmax)


def is_moment(x) -> bool:
    """Leaf predicate for ``jax.tree.map`` over trees of moments."""
    return isinstance(x, Blockwise8bit)


def state_nbytes(tree) -> int:
    """Bytes of every array in a tree of moments (codes, absmax, the 1 KiB maps, fp32 moments)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def leading_split(shape, blocksize: int, sharding):
    """The mesh axis (or axes) splitting a parameter of ``shape`` when ``sharding`` (a
    NamedSharding) splits only its leading axis, evenly and in whole ``blocksize`` blocks; else
    None. Only then does a shard's flat slice hold whole state blocks of the global layout, so
    its block absmax shards along with it and a per-shard update equals the global one."""
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or mesh is None or not shape:
        return None
    split = [i for i, s in enumerate(spec) if s is not None]
    if split != [0]:
        return None
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = int(np.prod([mesh.shape[n] for n in names]))
    per_shard = shape[0] // shards * int(np.prod(shape[1:], dtype=np.int64))
    if shape[0] % shards or per_shard % blocksize:
        return None
    return spec[0]
