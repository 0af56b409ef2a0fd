"""Glue between ``Packed4bit`` and the Pallas 4-bit kernels: operand views, tiling, crossover.

The kernels read the canonical bitsandbytes bytes (no second copy of the weight, nothing to
re-serialise): ``packed`` viewed as ``[N, K/2]`` and absmax as ``[N, K/blocksize]``, which
is exact whenever K is a multiple of the blocksize (no block straddles two rows). Double
quantization is undone in-kernel (uint8 absmax codes, nested scales, offset).

Launch parameters live in ``GPU_CONFIG`` so a benchmark can sweep them; the tiles are the
best of a sweep on an H100 with the select-tree decode, and the decode is the inline-PTX
``prmt`` one, which measured faster in every kernel row (benchmarks/RESULTS.md); fp32
activations fall back to the exact select tree inside the kernel. ``GEMV_MAX_M`` is the measured
GEMV/GEMM crossover in rows of x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowbit_jax import quant
from pallas_kernels import gemm_4bit, gemv_4bit

GPU_CONFIG = {
    # GEMV with 1..4 rows (elementwise fma) and with 5..GEMV_MAX_M rows (dot, x padded to 16)
    "gemv_fma": dict(block_n=128, block_h=64, splits=8, decode="prmt", num_warps=4, num_stages=3),
    "gemv_dot": dict(block_n=64, block_h=128, splits=4, decode="prmt", num_warps=8, num_stages=3),
    "gemm": dict(block_m=128, block_n=128, block_h=64, decode="prmt", num_warps=8, num_stages=4),
    "bwd": dict(block_m=64, block_n=64, block_h=64, decode="prmt", num_warps=4, num_stages=3),
}
# Crossovers measured on an H100 at K=4096, N=14336 (benchmarks/RESULTS.md): the GEMV beat the
# GEMM at M=1 and 16; the GEMM beat the tiled path at M=128 and lost at M=1024.
GEMV_MAX_M = 16  # rows of x up to which the split-K GEMV runs
# rows of x from which W is decoded in chunks of TILE_ROWS output rows to bf16 and multiplied
# by XLA's dot (cuBLAS): with many rows the in-kernel decode, repeated for every M tile, costs
# more than one decode pass plus a vendor GEMM. A scan over the chunks keeps one chunk
# (TILE_ROWS x K in x's dtype) alive at a time.
TILED_MIN_M = 512
TILE_ROWS = 2048


def supported(q: quant.Packed4bit) -> bool:
    k = q.shape[1]
    return len(q.shape) == 2 and k % q.blocksize == 0 and k % 2 == 0


def operands(q: quant.Packed4bit) -> dict:
    """Kernel views of the canonical arrays (reshapes and a bitcast only: no copy of W)."""
    n, k = q.shape
    packed = q.packed
    if packed.dtype != jnp.uint8:
        packed = jax.lax.bitcast_convert_type(packed, jnp.uint8)
    ops = dict(packed=packed.reshape(n, k // 2), absmax=q.absmax.reshape(n, k // q.blocksize),
               quant_type=q.quant_type, blocksize=q.blocksize)
    if q.double_quant:
        ops.update(nested_absmax=q.nested_absmax.reshape(-1), offset=q.offset,
                   nested_code=jnp.asarray(q.nested_code, jnp.float32),
                   nested_blocksize=q.nested_blocksize)
    return ops


def _pow2_divisor(n: int, cap: int, floor: int = 16) -> int | None:
    """The largest power of two in [floor, cap] dividing n, or None."""
    b = cap
    while b >= floor:
        if n % b == 0:
            return b
        b //= 2
    return None


def _block_h(kh: int, cap: int, half_block: int) -> int:
    """Byte-tile width dividing K/2 that nests with blocksize/2 (one of them divides the other)."""
    b = cap
    while b >= 16:
        if kh % b == 0 and (b % half_block == 0 or half_block % b == 0):
            return b
        b //= 2
    raise ValueError(f"no byte tile divides K/2={kh}")  # unreachable when supported()


def _pad_rows(a, mult):
    pad = (-a.shape[0]) % mult
    return a if pad == 0 else jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1))


def _weight_rows(ops, n, block_n_cap):
    """Pick block_n dividing N; pad the weight rows only when no power of two >= 16 does."""
    bn = _pow2_divisor(n, block_n_cap)
    if bn is None:  # ragged N (not a multiple of 16): pads W's rows (a copy) -- rare in models
        bn = block_n_cap
        ops = dict(ops, packed=_pad_rows(ops["packed"], bn), absmax=_pad_rows(ops["absmax"], bn))
    return ops, bn


def forward(x, q, bias=None, *, interpret=False):
    """``x @ W.T (+ bias)`` through the GEMV (M <= GEMV_MAX_M) or GEMM kernel."""
    n, k = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    ops = operands(q)
    kh = k // 2
    half_block = q.blocksize // 2
    if m >= TILED_MIN_M:
        return tiled_forward(x2, q, bias).reshape(*lead, n)
    if m <= GEMV_MAX_M:
        cfg = dict(GPU_CONFIG["gemv_fma" if m <= gemv_4bit.FMA_MAX_ROWS else "gemv_dot"])
        ops, bn = _weight_rows(ops, n, cfg.pop("block_n"))
        bh = _block_h(kh, cfg.pop("block_h"), half_block)
        splits = cfg.pop("splits")
        # splits must cut K/2 into whole byte tiles holding whole quantization blocks
        while splits > 1 and (kh % (splits * bh) or (2 * kh // splits) % q.blocksize):
            splits //= 2
        mp = 1 if m == 1 else 2 if m == 2 else 4 if m <= gemv_4bit.FMA_MAX_ROWS else -(-m // 16) * 16
        xp = _pad_rows(x2, mp)
        b = None if bias is None else _pad_rows(bias, bn)
        y = gemv_4bit.gemv_4bit(xp[:, 0::2], xp[:, 1::2], ops["packed"], ops["absmax"], **_rest(ops), bias=b,
                                block_n=bn, block_h=bh, splits=splits, interpret=interpret, **cfg)
    else:
        cfg = dict(GPU_CONFIG["gemm"])
        ops, bn = _weight_rows(ops, n, cfg.pop("block_n"))
        bh = _block_h(kh, cfg.pop("block_h"), half_block)
        bm = min(cfg.pop("block_m"), max(16, 1 << (m - 1).bit_length()))
        xp = _pad_rows(x2, bm)
        b = None if bias is None else _pad_rows(bias, bn)
        y = gemm_4bit.fused_forward(xp[:, 0::2], xp[:, 1::2], ops["packed"], ops["absmax"],
                                    **_rest(ops), bias=b, block_m=bm, block_n=bn, block_h=bh,
                                    interpret=interpret, **cfg)
    return y[:m, :n].reshape(*lead, n)


def _rest(ops):
    """Keyword operands besides the positional packed and absmax."""
    return {key: val for key, val in ops.items() if key not in ("packed", "absmax")}


def backward(g, q, *, interpret=False):
    """``g @ W`` ([..., N] -> [..., K], fp32-accumulated, g's dtype) without expanding W."""
    n, k = q.shape
    lead = g.shape[:-1]
    g2 = g.reshape(-1, n)
    m = g2.shape[0]
    if m >= TILED_MIN_M:
        return tiled_backward(g2, q).reshape(*lead, k)
    ops = operands(q)
    cfg = dict(GPU_CONFIG["bwd"])
    ops, bn = _weight_rows(ops, n, cfg.pop("block_n"))
    bh = _block_h(k // 2, cfg.pop("block_h"), q.blocksize // 2)
    bm = min(cfg.pop("block_m"), max(16, 1 << (m - 1).bit_length()))
    gp = _pad_rows(g2, bm)
    if gp.shape[1] != ops["packed"].shape[0]:  # W rows were padded: pad g's columns with zeros
        gp = jnp.pad(gp, ((0, 0), (0, ops["packed"].shape[0] - n)))
    packed, absmax = ops["packed"], ops["absmax"]
    even, odd = gemm_4bit.fused_backward(gp, packed, absmax, **_rest(ops), block_m=bm, block_n=bn,
                                         block_h=bh, interpret=interpret, **cfg)
    dx = jnp.stack([even[:m], odd[:m]], axis=-1).reshape(m, k)
    return dx.reshape(*lead, k)


def _chunks(q):
    """packed [C, rows, K/2] and fp32 absmax [C, rows, K/bs] in TILE_ROWS-row chunks (rows padded)."""
    n, k = q.shape
    rows = min(TILE_ROWS, n)
    packed = _pad_rows(operands(q)["packed"], rows)
    absmax = _pad_rows(quant.absmax_4bit(q).reshape(n, k // q.blocksize), rows)
    c = packed.shape[0] // rows
    return packed.reshape(c, rows, k // 2), absmax.reshape(c, rows, -1), rows


def _decode_chunk(q, p, a, dtype):
    code = jnp.asarray(q.code, jnp.float32)
    vals = jnp.stack([code[(p >> 4).astype(jnp.int32)], code[(p & 15).astype(jnp.int32)]], -1)
    rows, kh = p.shape
    return (vals.reshape(rows, a.shape[1], q.blocksize) * a[:, :, None]).reshape(rows, 2 * kh).astype(dtype)


def tiled_forward(x2, q, bias=None):
    """``x2 @ W.T`` for many rows: a scan decodes TILE_ROWS output rows of W, then XLA's dot."""
    n, k = q.shape
    packed, absmax, rows = _chunks(q)

    def step(_, chunk):
        p, a = chunk
        w = _decode_chunk(q, p, a, x2.dtype)
        return None, jnp.dot(x2, w.T, preferred_element_type=jnp.float32).astype(x2.dtype)

    _, ys = jax.lax.scan(step, None, (packed, absmax))  # [C, M, rows]
    y = jnp.moveaxis(ys, 0, 1).reshape(x2.shape[0], -1)[:, :n]
    if bias is not None:
        y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x2.dtype)
    return y


def tiled_backward(g2, q):
    """``g2 @ W`` for many rows, W decoded TILE_ROWS rows at a time inside a scan."""
    n, k = q.shape
    packed, absmax, rows = _chunks(q)
    c = packed.shape[0]
    gc = jnp.moveaxis(jnp.pad(g2, ((0, 0), (0, c * rows - n))).reshape(g2.shape[0], c, rows), 1, 0)

    def step(acc, chunk):
        p, a, g = chunk
        w = _decode_chunk(q, p, a, g2.dtype)
        return acc + jnp.dot(g, w, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(step, jnp.zeros((g2.shape[0], k), jnp.float32), (packed, absmax, gc))
    return acc.astype(g2.dtype)
