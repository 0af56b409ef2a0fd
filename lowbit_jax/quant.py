"""Quantized tensors and the pure-jnp transforms that make and undo them.

This module is the reference for every kernel in ``pallas_kernels`` and the storage contract
for the modules, optimizers and converters: the arrays held by the pytrees below are laid out
exactly as bitsandbytes 0.50 lays out its ``QuantState`` / ``Int8Params`` tensors, so a
checkpoint can move between the two libraries without requantization, and the codes and scales
we compute are bit-identical to bitsandbytes' on the same input.

Three containers, one per storage scheme:

* :class:`Packed4bit` -- blockwise NF4/FP4 (``bnb.functional.quantize_4bit``), optionally with
  double-quantized absmax (``compress_statistics=True``).
* :class:`Blockwise8bit` -- blockwise 8-bit with a 256-entry code (``quantize_blockwise``): the
  8-bit optimizer states and the nested absmax of double quantization.
* :class:`RowwiseInt8` -- LLM.int8 weights (``int8_vectorwise_quant``): ``CB``/``SCB``.

All three are registered pytrees: arrays are leaves, everything else (shape, dtype, blocksize,
quant_type, ...) is static aux data, so they pass through ``jax.jit``, ``jax.tree`` utilities,
``jax.device_put``, sharding and orbax unchanged.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import formats

__all__ = [
    "QuantizedTensor",
    "Packed4bit",
    "Blockwise8bit",
    "RowwiseInt8",
    "BLOCKSIZES_4BIT",
    "NESTED_BLOCKSIZE",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "quantize_int8",
    "dequantize_int8",
    "dequantize",
    "unpack_4bit_codes",
    "to_rows",
    "to_flat",
    "layer_slice",
    "absmax_4bit",
    "footprint",
    "Footprint",
]

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# bitsandbytes double-quantizes the 4-bit absmax in blocks of 256 with the signed dynamic map.
NESTED_BLOCKSIZE = 256
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# bitsandbytes clamps the divisor, not the stored absmax, so an all-zero block stays defined.
_TINY = np.float32(1e-38)
# 1/127 as bitsandbytes writes it (int8_vectorwise_dequant).
_INV_127 = np.float32(7.874015718698502e-3)


# --------------------------------------------------------------------------------------------
# Pytree containers
# --------------------------------------------------------------------------------------------


class QuantizedTensor:
    """Base of the quantized containers: a tensor of ``shape``/``dtype`` held in fewer bits.

    Subclasses are frozen dataclasses; ``_leaves`` names the array fields (pytree children),
    every other field is static metadata.
    """

    _leaves: ClassVar[tuple[str, ...]] = ()

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (what the tensor costs in memory or on disk)."""
        total = 0
        for name in self._leaves:
            leaf = getattr(self, name)
            if leaf is not None:
                total += int(np.prod(np.shape(leaf), dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        return total

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self, dtype)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _register(cls):
    leaves = cls._leaves
    static = tuple(f.name for f in dataclasses.fields(cls) if f.name not in leaves)

    def flatten_with_keys(obj):
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in leaves)
        return children, tuple(getattr(obj, n) for n in static)

    def flatten(obj):
        return tuple(getattr(obj, n) for n in leaves), tuple(getattr(obj, n) for n in static)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for n, v in zip(leaves, children):
            object.__setattr__(obj, n, v)
        for n, v in zip(static, aux):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


@_register
@dataclasses.dataclass(frozen=True)
class Packed4bit(QuantizedTensor):
    """A 4-bit blockwise (NF4/FP4) tensor, bitsandbytes' ``Params4bit`` + ``QuantState``.

    packed:        uint8 [ceil(n/2)]: the codes of the flattened row-major tensor, two a byte,
                   first in the high nibble.
    quant_storage: the dtype bitsandbytes stores those bytes as (``bnb_4bit_quant_storage``, e.g.
                   bfloat16 for FSDP). Applied only when exporting: in memory the codes stay
                   uint8, because a float view of code bytes holds NaN bit patterns that XLA may
                   canonicalise in any copy (seen with ``jnp.stack`` on the CPU), changing codes.
    absmax:        float32 [blocks] -- or, when double-quantized, uint8 [blocks] codes of
                   ``absmax - offset`` under the signed dynamic map in blocks of 256.
    nested_absmax: float32 [ceil(blocks/256)] scales of those codes (double quant only).
    offset:        float32 [] mean of the original absmax (double quant only).
    layout:        "bnb" for the canonical layout; kernels may derive others at load time.
    """

    _leaves: ClassVar[tuple[str, ...]] = ("packed", "absmax", "nested_absmax", "offset")

    packed: Any
    absmax: Any
    nested_absmax: Any = None
    offset: Any = None
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    blocksize: int = 64
    quant_type: str = "nf4"
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_storage: str = "uint8"
    layout: str = "bnb"

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def code(self) -> np.ndarray:
        """The 16-entry code table (bitsandbytes' ``quant_map``)."""
        return formats.get_4bit_code(self.quant_type)

    @property
    def nested_code(self) -> np.ndarray:
        return formats.dynamic_map(True)

    @property
    def num_blocks(self) -> int:
        return -(-self.size // self.blocksize)


@_register
@dataclasses.dataclass(frozen=True)
class Blockwise8bit(QuantizedTensor):
    """An 8-bit blockwise tensor under a 256-entry code (bitsandbytes' ``quantize_blockwise``).

    codes:  uint8, the tensor's own shape.
    absmax: float32 [blocks] (or uint8 codes when nested).
    code:   float32 [256], the map the codes index (dynamic signed/unsigned by default). It is a
            leaf, not static data, because a map is 1 KiB of floats, not a hashable constant.
    """

    _leaves: ClassVar[tuple[str, ...]] = ("codes", "absmax", "code", "nested_absmax", "offset")

    codes: Any
    absmax: Any
    code: Any
    nested_absmax: Any = None
    offset: Any = None
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    blocksize: int = 4096

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


@_register
@dataclasses.dataclass(frozen=True)
class RowwiseInt8(QuantizedTensor):
    """An LLM.int8 weight: bitsandbytes' ``Int8Params`` ``CB`` (int8 [out, in]) and ``SCB``.

    codes:      int8 [..., in], each row scaled to [-127, 127] by its own absmax.
    row_absmax: float32 [rows] (bitsandbytes' ``SCB``).
    """

    _leaves: ClassVar[tuple[str, ...]] = ("codes", "row_absmax")

    codes: Any
    row_absmax: Any
    shape: tuple[int, ...] = ()
    dtype: str = "float32"

    @property
    def CB(self):  # noqa: N802 - bitsandbytes' name
        return self.codes

    @property
    def SCB(self):  # noqa: N802 - bitsandbytes' name
        return self.row_absmax


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _rounded(x: jax.Array) -> jax.Array:
    """``x`` rounded to its dtype before any later add.

    XLA's CPU backend contracts ``a * b + c`` into one fused multiply-add (a single rounding),
    and ``optimization_barrier`` does not survive to stop it. bitsandbytes rounds the product
    first; a select on the product hides it from the contraction while keeping NaNs NaN.
    """
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def _check_float(x, name: str) -> None:
    dt = jnp.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got dtype {dt}")


def _check_blocksize(blocksize, allowed, name: str = "blocksize") -> int:
    if not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {blocksize!r}")
    return int(blocksize)


def _out_dtype(dtype, default: str, name: str = "dtype"):
    dt = jnp.dtype(default if dtype is None else dtype)
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dt}")
    return dt


# --------------------------------------------------------------------------------------------
# Blockwise absmax scaling shared by the 4-bit and 8-bit paths
# --------------------------------------------------------------------------------------------


def _block_absmax(flat: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """Pad ``flat`` (float32) to whole blocks; return ``(blocks [B, blocksize], absmax [B])``.

    Zero padding cannot change a block's absmax, and the padded tail is dropped after packing.
    """
    n = flat.shape[0]
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    blocks = jnp.pad(flat, (0, pad)).reshape(nblocks, blocksize)
    return blocks, jnp.max(jnp.abs(blocks), axis=1)


def _scale_bnb_4bit(blocks: jax.Array, absmax: jax.Array, n: int, blocksize: int) -> jax.Array:
    """``x / absmax`` exactly as bitsandbytes' 4-bit path rounds it.

    Full blocks are multiplied by the float32 reciprocal, the partial last block is divided
    (two different roundings in bitsandbytes; bit-exact codes need both).
    """
    safe = jnp.maximum(absmax, _TINY)[:, None]
    # The reciprocal is its own op: fused into the multiply, XLA may vectorise it with an
    # approximate reciprocal that is off by an ulp, which moves values on a code boundary.
    inv = jax.lax.optimization_barrier(jnp.float32(1.0) / safe)
    scaled = blocks * inv
    if n % blocksize:
        # A true division: XLA rewrites x / broadcast(y) into x * broadcast(1 / y), so the
        # divisor is materialised at full shape behind a barrier the simplifier cannot see through.
        denom = jax.lax.optimization_barrier(jnp.broadcast_to(safe[-1:], blocks[-1:].shape))
        last = blocks[-1:] / denom
        scaled = jnp.concatenate([scaled[:-1], last], axis=0)
    return jnp.clip(scaled, -1.0, 1.0)



# --------------------------------------------------------------------------------------------
# The double-quantization offset: torch's float32 CPU mean, reproduced
# --------------------------------------------------------------------------------------------
# bitsandbytes subtracts ``absmax.mean()`` before double quantization and stores it. The mean
# is a float32 reduction whose last bit depends on the summation order, and every nested code
# depends on that bit, so we replay torch's CPU order (ATen's SumKernel ``cascade_sum``: 8-lane
# vectors, 4 independent accumulators, a 4-level cascade over chunks of 2**max(4, log2(n)/4)).
# This is the single-threaded order; torch splits reductions of >= 32768 elements across its
# threads, and CUDA reduces in yet another order, so for those the offset may differ in the
# last bit while remaining a valid mean.

_SUM_LANES = 8


def _seq_sum(a: jax.Array) -> jax.Array:
    """Left-to-right float32 sum over axis 0, starting from 0 (unrolled; XLA keeps the order)."""
    acc = jnp.zeros(a.shape[1:], a.dtype)
    for i in range(a.shape[0]):
        acc = acc + a[i]
    return acc


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else int(x - 1).bit_length()


def _cascade_sum(rows: jax.Array) -> jax.Array:
    """ATen ``multi_row_sum``: a 4-level cascade of sequential sums, lane by lane."""
    size, lanes = rows.shape
    step = 1 << max(4, _ceil_log2(size) // 4)

    def grouped(a):
        g = a.shape[0] // step
        full = a[: g * step].reshape(g, step, lanes).transpose(1, 0, 2)
        return _seq_sum(full), a[g * step :]

    p0, tail0 = grouped(rows)
    p1, rest1 = grouped(p0)
    p2, rest2 = grouped(p1)
    return ((_seq_sum(tail0) + _seq_sum(rest1)) + _seq_sum(rest2)) + _seq_sum(p2)


def _row_sum(x: jax.Array) -> jax.Array:
    """ATen ``row_sum`` over axis 0 of ``x`` [n, lanes]: 4 interleaved accumulators."""
    n, lanes = x.shape
    size_ilp = n // 4
    if size_ilp:
        ps = _cascade_sum(x[: size_ilp * 4].reshape(size_ilp, 4 * lanes)).reshape(4, lanes)
    else:
        ps = jnp.zeros((4, lanes), x.dtype)
    p0 = ps[0]
    for k in range(size_ilp * 4, n):
        p0 = p0 + x[k]
    return ((p0 + ps[1]) + ps[2]) + ps[3]


def _torch_cpu_sum(x: jax.Array) -> jax.Array:
    """``torch.sum`` of a contiguous float32 vector on the CPU, bit for bit (single thread)."""
    x = x.reshape(-1).astype(jnp.float32)
    n = x.shape[0]
    if n < _SUM_LANES:
        return _row_sum(x[:, None])[0]
    vec_size = n // _SUM_LANES
    vec_acc = _row_sum(x[: vec_size * _SUM_LANES].reshape(vec_size, _SUM_LANES))
    acc = jnp.zeros((), jnp.float32)
    for k in range(vec_size * _SUM_LANES, n):
        acc = acc + x[k]
    for lane in range(_SUM_LANES):
        acc = acc + vec_acc[lane]
    return acc


def _bnb_mean(x: jax.Array) -> jax.Array:
    """``x.mean()`` as torch computes it on the CPU: the float32 sum divided by n."""
    # Both barriers keep XLA exact: it would turn ``/ n`` into ``* (1/n)`` (another rounding)
    # and fuse the later ``absmax - offset`` into a fused multiply-add.
    n = jax.lax.optimization_barrier(jnp.float32(x.size))
    return jax.lax.optimization_barrier(_torch_cpu_sum(x) / n)

# --------------------------------------------------------------------------------------------
# 8-bit blockwise (dynamic map)
# --------------------------------------------------------------------------------------------


# bitsandbytes' CPU kernel does not binary-search the code: it discretises [-1, 1] into 65536
# bins, precomputes the nearest code of each bin's left edge, and rounds every scaled value to
# a bin. That is nearest-code up to a bin width (3e-5), not exactly; we replay it so the codes
# are bit-identical. It is also fast: a multiply, a round and a 64 KiB table gather.
_LUT_SIZE = 65536
_LUT_EDGES = (
    np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
).astype(np.float32)


def _code_lut(code: jax.Array) -> jax.Array:
    """uint8 [65536]: for each bin edge, the number of code midpoints strictly below it."""
    mids = jnp.float32(0.5) * (code[:-1] + code[1:])
    return jnp.searchsorted(mids, jnp.asarray(_LUT_EDGES), side="left").astype(jnp.uint8)


def _lut_codes(blocks: jax.Array, absmax: jax.Array, code: jax.Array) -> jax.Array:
    """Codes of ``blocks`` [B, blocksize] (float32) scaled by ``absmax`` [B], bnb's CPU rule."""
    inv = jnp.float32(1.0) / jnp.where(absmax == 0, jnp.float32(1.0), absmax)
    normed = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
    t = (normed + jnp.float32(1.0)) * jnp.float32(0.5)
    idx = (t * jnp.float32(_LUT_SIZE - 1) + jnp.float32(0.5)).astype(jnp.int32)
    codes = jnp.take(_code_lut(code), idx, axis=0)
    # An all-zero block stores absmax 0 and code index 0 (not the index of 0.0), as bnb does.
    return jnp.where((absmax == 0)[:, None], jnp.uint8(0), codes)


@partial(jax.jit, static_argnames=("blocksize", "nested"))
def quantize_blockwise(
    x,
    code=None,
    blocksize: int = 4096,
    nested: bool = False,
) -> Blockwise8bit:
    """8-bit blockwise quantization, bit-identical to ``bnb.functional.quantize_blockwise``.

    Each block of ``blocksize`` values is divided by its absmax and every value mapped to the
    nearest entry of ``code`` (default: the signed dynamic map). ``nested=True`` quantizes the
    absmax again, minus its mean, with the same blocksize (bitsandbytes' ``nested``).
    """
    _check_float(x, "x")
    blocksize = _check_blocksize(blocksize, BLOCKSIZES_8BIT)
    x = jnp.asarray(x)
    code_arr = jnp.asarray(formats.dynamic_map(True) if code is None else code, dtype=jnp.float32)
    if code_arr.shape != (256,):
        raise ValueError(f"code must be a float32 array of 256 sorted values, got shape {code_arr.shape}")
    shape = tuple(x.shape)
    n = int(np.prod(shape, dtype=np.int64))
    flat = x.reshape(-1).astype(jnp.float32)
    blocks, absmax = _block_absmax(flat, blocksize)
    codes = _lut_codes(blocks, absmax, code_arr).reshape(-1)[:n].reshape(shape)
    nested_absmax = offset = None
    if nested:
        offset = _bnb_mean(absmax)
        inner = quantize_blockwise(absmax - offset, blocksize=blocksize)
        absmax, nested_absmax = inner.codes, inner.absmax
    return Blockwise8bit(
        codes=codes,
        absmax=absmax,
        code=code_arr,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=shape,
        dtype=jnp.dtype(x.dtype).name,
        blocksize=blocksize,
    )


def _dequantize_blockwise_arrays(codes, absmax, code, blocksize: int, n: int) -> jax.Array:
    """float32 values of ``codes`` (flat, length n) scaled per block by ``absmax``."""
    values = jnp.take(jnp.asarray(code, jnp.float32), codes.reshape(-1).astype(jnp.int32), axis=0)
    nblocks = -(-n // blocksize)
    values = jnp.pad(values, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    return (values * absmax.astype(jnp.float32)[:, None]).reshape(-1)[:n]


def _nested_absmax_values(qabsmax, nested_absmax, offset, nested_blocksize: int, code=None) -> jax.Array:
    """Undo double quantization of an absmax vector: dequantize, then add the offset back."""
    code = formats.dynamic_map(True) if code is None else code
    qabsmax = qabsmax.reshape(-1)
    n = qabsmax.shape[0]
    scaled = _rounded(_dequantize_blockwise_arrays(qabsmax, nested_absmax, code, nested_blocksize, n))
    return scaled + offset


@partial(jax.jit, static_argnames=("dtype",))
def dequantize_blockwise(q: Blockwise8bit, dtype=None) -> jax.Array:
    """Inverse of :func:`quantize_blockwise` (``bnb.functional.dequantize_blockwise``)."""
    if not isinstance(q, Blockwise8bit):
        raise ValueError(f"q must be a Blockwise8bit, got {type(q).__name__}")
    out_dtype = _out_dtype(dtype, q.dtype)
    absmax = q.absmax
    if q.nested:
        absmax = _nested_absmax_values(q.absmax, q.nested_absmax, q.offset, q.blocksize)
    values = _dequantize_blockwise_arrays(q.codes, absmax, q.code, q.blocksize, q.size)
    return values.reshape(q.shape).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# 4-bit blockwise (NF4 / FP4)
# --------------------------------------------------------------------------------------------


def _codes_4bit(scaled: jax.Array, quant_type: str) -> jax.Array:
    """Nearest-code index per value of ``scaled`` in [-1, 1] (bitsandbytes' bucketize rule).

    The rank is the number of decision boundaries strictly below the value, so a value exactly
    on a boundary goes to the lower code -- ``torch.bucketize(right=False)``.
    """
    if quant_type == "nf4":
        bounds = formats.midpoints(formats.NF4_CODE)
        rank = jnp.zeros(scaled.shape, jnp.int32)
        for b in bounds:  # 15 compares, fused by XLA into one pass
            rank = rank + (scaled > b).astype(jnp.int32)
        return rank.astype(jnp.uint8)
    sorted_vals = formats.FP4_CODE[formats.FP4_SORT_ORDER]
    bounds = formats.midpoints(sorted_vals)
    rank = jnp.zeros(scaled.shape, jnp.int32)
    for b in bounds:
        rank = rank + (scaled > b).astype(jnp.int32)
    return jnp.take(jnp.asarray(formats.FP4_SORT_ORDER, jnp.uint8), rank, axis=0)


def _pack_nibbles(codes: jax.Array) -> jax.Array:
    """Two 4-bit codes a byte, first in the high nibble (``codes`` has even length)."""
    pairs = codes.reshape(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(jnp.uint8)


def unpack_4bit_codes(packed: jax.Array, n: int) -> jax.Array:
    """uint8 codes (0..15) of the first ``n`` elements of a packed 4-bit buffer."""
    packed = packed.reshape(-1)
    if packed.dtype != jnp.uint8:
        packed = jax.lax.bitcast_convert_type(packed, jnp.uint8).reshape(-1)
    both = jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)
    return both[:n]


def quantize_4bit(
    w,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage=jnp.uint8,
) -> Packed4bit:
    """Blockwise 4-bit quantization, bit-identical to ``bnb.functional.quantize_4bit``.

    ``w`` is flattened row-major (for a linear layer pass it in PyTorch's ``[out, in]`` order,
    as bitsandbytes stores it). ``compress_statistics=True`` is double quantization: the float32
    absmax minus its mean, 8-bit quantized in blocks of 256.
    """
    _check_float(w, "w")
    blocksize = _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    if quant_type not in formats.QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES_4BIT}, got {quant_type!r}")
    storage = jnp.dtype(quant_storage)
    w = jnp.asarray(w)
    shape = tuple(w.shape)
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        raise ValueError(f"w must have at least one element, got shape {shape}")
    nbytes = -(-n // 2)
    if nbytes % storage.itemsize:
        raise ValueError(
            f"quant_storage {storage.name} needs the packed byte count ({nbytes}) to be a multiple "
            f"of {storage.itemsize}"
        )
    packed, absmax, nested_absmax, offset = _quantize_4bit_arrays(w, blocksize, quant_type, compress_statistics)
    return Packed4bit(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=shape,
        dtype=jnp.dtype(w.dtype).name,
        blocksize=blocksize,
        quant_type=quant_type,
        quant_storage=storage.name,
    )


@partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_4bit_arrays(w, blocksize: int, quant_type: str, compress_statistics: bool):
    n = w.size
    flat = w.reshape(-1).astype(jnp.float32)
    blocks, absmax = _block_absmax(flat, blocksize)
    scaled = _scale_bnb_4bit(blocks, absmax, n, blocksize).reshape(-1)[:n]
    # An odd count is padded with a scaled 0.0 *before* coding (NF4 stores code 7 there).
    scaled = jnp.pad(scaled, (0, n % 2))
    packed = _pack_nibbles(_codes_4bit(scaled, quant_type))
    nested_absmax = offset = None
    if compress_statistics:
        # A block holding NaN/Inf must not poison the shared mean and the 255 neighbours quantized
        # with it: its scale enters double quantization as 0 (that block is lost either way).
        # A no-op on finite weights, which stay bit-identical to bitsandbytes.
        absmax = jnp.where(jnp.isfinite(absmax), absmax, jnp.float32(0))
        offset = _bnb_mean(absmax)
        inner = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        absmax, nested_absmax = inner.codes, inner.absmax
    return packed, absmax, nested_absmax, offset


def absmax_4bit(q: Packed4bit) -> jax.Array:
    """The float32 per-block absmax of a 4-bit tensor, undoing double quantization if any."""
    if q.double_quant:
        values = _nested_absmax_values(q.absmax, q.nested_absmax, q.offset, q.nested_blocksize)
        return values.reshape(q.absmax.shape)
    return q.absmax.astype(jnp.float32)


@partial(jax.jit, static_argnames=("dtype",))
def dequantize_4bit(q: Packed4bit, dtype=None) -> jax.Array:
    """Inverse of :func:`quantize_4bit` (``bnb.functional.dequantize_4bit``).

    Values are computed in float32 (code * absmax) and cast once to ``dtype`` (default: the
    dtype the tensor was quantized from), as bitsandbytes does.
    """
    if not isinstance(q, Packed4bit):
        raise ValueError(f"q must be a Packed4bit, got {type(q).__name__}")
    out_dtype = _out_dtype(dtype, q.dtype)
    n = q.size
    codes = unpack_4bit_codes(q.packed, n).astype(jnp.int32)
    values = jnp.take(jnp.asarray(q.code), codes, axis=0)
    absmax = absmax_4bit(q).reshape(-1)  # [blocks], or [out, blocks/out] in the "rows" layout
    nblocks = absmax.shape[0]
    values = jnp.pad(values, (0, nblocks * q.blocksize - n)).reshape(nblocks, q.blocksize)
    out = (values * absmax[:, None]).reshape(-1)[:n]
    return out.reshape(q.shape).astype(out_dtype)


# --------------------------------------------------------------------------------------------
# LLM.int8 row-wise
# --------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("threshold",))
def int8_vectorwise_quant(x, threshold: float = 0.0):
    """Row-wise absmax int8 quantization with outlier columns (``bnb.functional.int8_vectorwise_quant``).

    ``x`` is [..., cols]; leading dims are rows. With ``threshold > 0`` every column holding any
    ``|x| >= threshold`` is an outlier column: its entries are excluded from the row absmax and
    zeroed in the codes (bitsandbytes sends them through a 16-bit matmul instead).

    Returns ``(codes int8 [rows, cols], row_absmax float32 [rows], outlier_cols bool [cols])``.
    The outlier set is a boolean mask rather than bitsandbytes' index list because its length
    is data-dependent and jit needs static shapes; ``jnp.flatnonzero(mask)`` gives the indices.
    """
    _check_float(x, "x")
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension, got shape {x.shape}")
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if threshold > 0.0:
        outliers = jnp.abs(x2) >= jnp.asarray(threshold, x2.dtype)
        outlier_cols = jnp.any(outliers, axis=0)
        x2 = jnp.where(outliers, jnp.zeros((), x2.dtype), x2)
    else:
        outlier_cols = jnp.zeros((x2.shape[1],), bool)
    row_absmax = jnp.max(jnp.abs(x2), axis=1).astype(jnp.float32)
    # torch evaluates ``127.0 / row_stats`` as ``row_stats.reciprocal() * 127.0``: two roundings.
    scale = _rounded(jnp.float32(1.0) / row_absmax) * jnp.float32(127.0)
    scaled = x2.astype(jnp.float32) * scale[:, None]
    codes = jnp.where(row_absmax[:, None] > 0, jnp.round(scaled), 0.0).astype(jnp.int8)
    if threshold > 0.0 and rows > 1:
        codes = jnp.where(outlier_cols[None, :], jnp.int8(0), codes)
    return codes, row_absmax, outlier_cols


def int8_vectorwise_dequant(codes, row_absmax) -> jax.Array:
    """float32 ``codes * row_absmax / 127`` as bitsandbytes rounds it (``* 7.874015718698502e-3``)."""
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.int8:
        raise ValueError(f"codes must be int8, got {codes.dtype}")
    return (codes.astype(jnp.float32) * jnp.asarray(row_absmax, jnp.float32).reshape(-1, 1)) * _INV_127


def quantize_int8(w) -> RowwiseInt8:
    """An LLM.int8 weight (bitsandbytes' ``Int8Params``): row-wise int8 over the last axis."""
    _check_float(w, "w")
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    codes, row_absmax, _ = int8_vectorwise_quant(w, 0.0)
    return RowwiseInt8(codes=codes, row_absmax=row_absmax, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name)


@partial(jax.jit, static_argnames=("dtype",))
def dequantize_int8(q: RowwiseInt8, dtype=None) -> jax.Array:
    if not isinstance(q, RowwiseInt8):
        raise ValueError(f"q must be a RowwiseInt8, got {type(q).__name__}")
    out_dtype = _out_dtype(dtype, q.dtype)
    return int8_vectorwise_dequant(q.codes, q.row_absmax).reshape(q.shape).astype(out_dtype)


def dequantize(q, dtype=None) -> jax.Array:
    """Dequantize any quantized container (arrays pass through, cast to ``dtype`` if given)."""
    if isinstance(q, Packed4bit):
        return dequantize_4bit(q, dtype)
    if isinstance(q, Blockwise8bit):
        return dequantize_blockwise(q, dtype)
    if isinstance(q, RowwiseInt8):
        return dequantize_int8(q, dtype)
    arr = jnp.asarray(q)
    return arr if dtype is None else arr.astype(dtype)


def layer_slice(tree, i):
    """Layer ``i`` of a tree stacked over a leading axis (a scanned model's ``[L, ...]`` leaves;
    quantized containers keep their per-layer static shape). In XLA this is a copy of the layer;
    ``ops.matmul_4bit(layer=)`` avoids it where the kernel can read the stack in place."""
    return jax.tree.map(lambda a: a[i], tree)


# --------------------------------------------------------------------------------------------
# Row layout: the same bytes viewed as [out, ...] so a weight can be split along either axis
# --------------------------------------------------------------------------------------------


def to_rows(q: Packed4bit) -> Packed4bit:
    """View a 2-D weight's codes and absmax as ``[out, in/2]`` and ``[out, in/blocksize]``.

    The bytes are the canonical bitsandbytes ones (row-major), only the array shapes change,
    so the input dimension can be sharded in whole quantization blocks. Needs ``in`` to be a
    multiple of the blocksize (blocks then never straddle rows). ``to_flat`` undoes it.
    """
    if len(q.shape) != 2:
        raise ValueError(f"to_rows needs a 2-D weight [out, in], got shape {q.shape}")
    out_f, in_f = q.shape
    if in_f % q.blocksize:
        raise ValueError(
            f"to_rows needs in-features ({in_f}) to be a multiple of the blocksize ({q.blocksize})"
        )
    return q.replace(
        packed=q.packed.reshape(out_f, in_f // 2),
        absmax=q.absmax.reshape(out_f, in_f // q.blocksize),
        layout="rows",
    )


def to_flat(q: Packed4bit) -> Packed4bit:
    """The canonical flat layout (what serialisation writes)."""
    return q.replace(packed=q.packed.reshape(-1), absmax=q.absmax.reshape(-1), layout="bnb")


# --------------------------------------------------------------------------------------------
# Footprint
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Footprint:
    """Bytes and parameter counts of a pytree; ``str()`` is a per-leaf table."""

    rows: list[tuple[str, str, int, int]]  # (path, kind, params, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def total_params(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.total_bytes / max(self.total_params, 1)

    def table(self, max_rows: Optional[int] = None) -> str:
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        width = max([len("leaf")] + [len(r[0]) for r in rows])
        lines = [f"{'leaf':<{width}}  {'kind':<12} {'params':>12} {'bytes':>14} {'bits/param':>10}"]
        for path, kind, params, nbytes in rows:
            bpp = 8.0 * nbytes / max(params, 1)
            lines.append(f"{path:<{width}}  {kind:<12} {params:>12,} {nbytes:>14,} {bpp:>10.3f}")
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more leaves")
        lines.append(
            f"{'total':<{width}}  {'':<12} {self.total_params:>12,} {self.total_bytes:>14,} "
            f"{self.bits_per_param:>10.3f}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _kind(q) -> str:
    if isinstance(q, Packed4bit):
        return q.quant_type + ("+dq" if q.double_quant else "")
    if isinstance(q, Blockwise8bit):
        return "blockwise8"
    if isinstance(q, RowwiseInt8):
        return "int8"
    return jnp.dtype(q.dtype).name


def _stacked_copies(q: QuantizedTensor) -> int:
    """How many tensors a container holds: models stack per-layer weights along a leading axis
    (one container for all layers, static ``shape`` per layer), which only the arrays show."""
    primary = q.packed if isinstance(q, Packed4bit) else q.codes
    stored = int(np.prod(np.shape(primary), dtype=np.int64)) * jnp.dtype(primary.dtype).itemsize
    per_copy = (q.size + 1) // 2 if isinstance(q, Packed4bit) else q.size
    return max(1, stored // max(per_copy, 1))


def footprint(tree) -> Footprint:
    """Memory of any pytree holding quantized containers and plain arrays, leaf by leaf.

    A quantized container counts as one leaf whose parameters are its logical elements and
    whose bytes are all of its stored arrays (codes, scales, nested scales).
    """
    is_q = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]:
        name = jax.tree_util.keystr(path) or "<root>"
        if isinstance(leaf, QuantizedTensor):
            rows.append((name, _kind(leaf), leaf.size * _stacked_copies(leaf), leaf.nbytes))
        elif hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            size = int(np.prod(leaf.shape, dtype=np.int64))
            rows.append((name, _kind(leaf), size, size * jnp.dtype(leaf.dtype).itemsize))
    return Footprint(rows)
