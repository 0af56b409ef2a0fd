"""Code tables: the value each low-bit code stands for, exactly as bitsandbytes 0.50 builds them.

These tables are the storage contract shared with bitsandbytes: a checkpoint written by either
library is only readable by the other if every code maps to the same float32 value. The
builders therefore reproduce bitsandbytes' arithmetic step by step in float32 (including
``torch.linspace``'s two-sided interpolation) instead of computing "the same" numbers in
float64, which would differ in the last bit.

Everything here is plain numpy (computed once, on the host); ``quant`` turns them into jnp
constants.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "FP4_SORT_ORDER",
    "QUANT_TYPES_4BIT",
    "get_4bit_code",
    "create_dynamic_map",
    "create_linear_map",
    "create_normal_map",
    "create_fp8_map",
    "dynamic_map",
    "midpoints",
]

# NF4: quantiles of N(0, 1), normalised to [-1, 1] (QLoRA). Sorted, so code index == rank.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in *bit-pattern* order, divided by 12 in
# float32 as bitsandbytes' get_4bit_type does. Index 8 is the sign bit on zero, but bitsandbytes
# writes it as the Python int ``-0``, which is +0.0; so do we.
FP4_CODE = (
    np.array(
        [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
        dtype=np.float32,
    )
    / np.float32(12.0)
).astype(np.float32)

# FP4 codes sorted by value, as bitsandbytes' argsort orders them. The order of the two zeros
# matters for bit-exactness: values in (0, 0.0026] map to code 8, values in (-0.0026, 0] to code 0.
FP4_SORT_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.int32)

QUANT_TYPES_4BIT = ("nf4", "fp4")


def get_4bit_code(quant_type: str) -> np.ndarray:
    """The 16 float32 values of a 4-bit code, indexed by the 4-bit code."""
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")


def midpoints(sorted_values: np.ndarray) -> np.ndarray:
    """Decision boundaries between neighbouring sorted code values, computed in float32."""
    v = np.asarray(sorted_values, dtype=np.float32)
    return ((v[:-1] + v[1:]) / np.float32(2.0)).astype(np.float32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit.

    torch computes a float32 step, then interpolates from the start for the first half and from
    the end for the second half with a fused multiply-add (one rounding). A float64
    multiply-add of float32 operands followed by one rounding to float32 reproduces that
    (the product of a float32 and a small integer is exact in float64). numpy's linspace
    rounds differently, so its last bits differ and the dynamic map would not match.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(
        i < steps // 2,
        np.float64(start32) + step * i,
        np.float64(end32) - step * (steps - 1 - i),
    )
    return out.astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The 8-bit dynamic (tree) map of Dettmers 2015, as ``bitsandbytes.functional.create_dynamic_map``.

    Used for 8-bit blockwise quantization: optimizer states (signed for the first moment,
    unsigned for the second) and the double-quantized 4-bit absmax.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = _torch_linspace_f32(0.1, 1.0, fraction_items)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    if additional_items > 0:
        boundaries = _torch_linspace_f32(0.1, 1.0, additional_items + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    data.append(0.0)
    data.append(1.0)
    if len(data) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits}, "
            f"total_bits={total_bits} gives {len(data)} values, expected {2**total_bits}"
        )
    data += [0.0] * (256 - len(data))
    data.sort()
    return np.array(data, dtype=np.float32)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> np.ndarray:
    """A uniform map over [-1, 1] (or [0, 1]), as ``bitsandbytes.functional.create_linear_map``."""
    sign = -1.0 if signed else 0.0
    total_values = 2**total_bits
    if add_zero or total_bits < 8:
        total_values = 2**total_bits if not signed else 2**total_bits - 1
    values = _torch_linspace_f32(sign, 1.0, total_values)
    gap = 256 - values.size
    if gap == 0:
        return values
    half = values.size // 2
    return np.array(values[:half].tolist() + [0.0] * gap + values[half:].tolist(), dtype=np.float32)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """The NormalFloat map (256 entries, 16 non-trivial), as ``create_normal_map``. Needs scipy."""
    try:
        from scipy.stats import norm
    except ImportError as e:  # pragma: no cover - scipy ships with the test extra
        raise ImportError("create_normal_map needs scipy (pip install scipy)") from e
    # torch.Tensor(list) is float32; ppf runs in float64 on the float32 linspace values.
    if use_extra_value:
        v1 = norm.ppf(_torch_linspace_f32(offset, 0.5, 9)[:-1].astype(np.float64)).tolist()
        v2 = [0.0] * (256 - 15)
        v3 = (-norm.ppf(_torch_linspace_f32(offset, 0.5, 8)[:-1].astype(np.float64))).tolist()
    else:
        v1 = norm.ppf(_torch_linspace_f32(offset, 0.5, 8)[:-1].astype(np.float64)).tolist()
        v2 = [0.0] * (256 - 14)
        v3 = (-norm.ppf(_torch_linspace_f32(offset, 0.5, 8)[:-1].astype(np.float64))).tolist()
    values = np.sort(np.array(v1 + v2 + v3, dtype=np.float32))
    return (values / values.max()).astype(np.float32)


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> np.ndarray:
    """A small-float map (sorted, normalised to [-1, 1]), as ``create_fp8_map``.

    ``create_fp8_map(True, 2, 1, 4)`` is FP4 in value order.
    """
    has_sign = 1 if signed else 0
    if exponent_bits + precision_bits != total_bits - has_sign:
        raise ValueError(
            f"exponent_bits + precision_bits must equal total_bits - sign bit, got "
            f"{exponent_bits} + {precision_bits} != {total_bits} - {has_sign}"
        )
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for evalue in range(2**exponent_bits):
        for bit_pattern in itertools.product([0, 1], repeat=precision_bits):
            value = 1.0 if evalue != 0 else 0.0
            for i, pval in enumerate(bit_pattern):
                value += pval * (2 ** -(i + 1))
            if evalue == 0:
                value = value * 2**-bias
            else:
                value = value * 2 ** -(evalue - bias - 1)
            values.append(value)
            if signed:
                values.append(-value)
    values.sort()
    if total_bits < 8:
        values += [0.0] * (256 - len(values))
    values.sort()
    code = np.array(values, dtype=np.float32)
    return (code / code.max()).astype(np.float32)


@lru_cache(maxsize=None)
def dynamic_map(signed: bool = True) -> np.ndarray:
    """The default 8-bit dynamic map (cached): bitsandbytes' ``name2qmap['dynamic'|'udynamic']``."""
    m = create_dynamic_map(signed=signed)
    m.setflags(write=False)
    return m
