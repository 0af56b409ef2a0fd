"""Glue between ``Packed4bit`` and the Pallas 4-bit kernels: operand views, tiling, crossover.

The kernels read the canonical bitsandbytes bytes (no second copy of the weight, nothing to
re-serialise): ``packed`` viewed as ``[N, K/2]`` and absmax as ``[N, K/blocksize]``, which
is exact whenever K is a multiple of the blocksize (no block straddles two rows). Double
quantization is undone in-kernel (uint8 absmax codes, nested scales, offset).

Which kernel, by rows of x (M): on Hopper (sm_90, JAX >= 0.11), 16-bit x with WGMMA_MIN_M..
WGMMA_MAX_M rows against layers of at least WGMMA_MIN_N rows take the Mosaic GPU wgmma GEMM
(``gemm_4bit_wgmma``: the weight decoded in registers as wgmma's left operand). Otherwise: one
row of bf16/fp16 x, the one-row GEMV (``gemv_4bit``);
up to ``GEMV_MAX_M`` rows, the split-K tensor-core GEMV (``gemm_4bit`` in dot mode, or fma
mode for a few fp32 rows); up to ``TILED_MIN_M``, the fused GEMM (the decoded W tile as the
dot's left operand, ``orient="wx"``); from there, a band of W's rows at a time decoded by
``dequant_4bit`` and multiplied by XLA's dot. Launch parameters
live in ``GPU_CONFIG`` so a benchmark can sweep them (best of sweeps on an H100,
benchmarks/KERNEL_NOTES.md); the decode is inline PTX: one read a byte of a shared-memory table
of decoded pairs ("lut": the one-row GEMV and the GEMM) or byte permutes of the table
in registers ("prmt": the split-K GEMV, the backward and the band decode); fp32 activations
fall back to the exact select tree inside the kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lowbit_jax import _compat, quant
from pallas_kernels import dequant_4bit, gemm_4bit, gemm_4bit_wgmma, gemv_4bit

GPU_CONFIG = {
    # one row of 16-bit x: row sums over whole cache lines (pallas_kernels.gemv_4bit)
    # engine "mma": each block's dot product on the tensor cores (blocksize 64; others: "rowsum"):
    # 22.9 vs 27.0 us at K=4096, N=14336 on an H100, same run (benchmarks/KERNEL_NOTES.md); with
    # the shared-memory byte table decode 16-row programs (half the table fills): 18.7-19.6 us vs
    # 20.0-20.7 with 8 rows (eighth session)
    "gemv": dict(block_n=16, blocks_per_iter=16, splits=1, prefetch=False, num_warps=4, num_stages=2,
                 engine="mma"),
    # ... for layers of at most GEMV_NARROW_MAX_N rows (attention projections at decode), where
    # 8-row programs leave SMs idle (N=1024: 128 programs): K split in two (fp32 partials summed
    # by XLA). Llama-3-8B decode, H100: 4.323 ms a token vs 4.425/4.434 unsplit, block_n 4 4.496,
    # block_n 2 4.556 (benchmarks/RESULTS.md, 15:40 UTC)
    # with the mma engine K is not split (9.7 vs 11.4 us split in two, rowsum 12.3, N=4096)
    "gemv_narrow": dict(block_n=8, blocks_per_iter=16, splits=1, prefetch=True, num_warps=4, num_stages=1,
                        engine="mma"),
    # split-K GEMV for 2..GEMV_MAX_M rows (and fp32 x): x padded to 16 rows, tensor-core dots
    # ("gemv_dot"); fp32 x with 1..FMA_MAX_ROWS rows: elementwise multiply-add ("gemv_fma")
    "gemv_fma": dict(block_n=128, block_h=64, splits=8, decode="prmt", num_warps=4, num_stages=3),
    "gemv_dot": dict(block_n=64, block_h=128, splits=4, decode="prmt", num_warps=4, num_stages=3),
    # split-K dot GEMV: the byte-table decode ("lut") was slower here (37-39 vs 31 us at M=16; its
    # 32 KB table beside the dot's pipelined tiles), the GEMM faster with it: 42.8-43.0 vs 47.2-47.9
    # us at M=64, 55.0-56.7 vs 58.7-59.3 at M=128 (N=14336, H100, same run, eighth session)
    "gemm": dict(block_m=128, block_n=128, block_h=64, decode="lut", orient="wx", num_warps=8, num_stages=4),
    "bwd": dict(block_m=64, block_n=64, block_h=64, decode="prmt", num_warps=4, num_stages=3),
    # the band decode of the large-M path (pallas_kernels.dequant_4bit)
    "dequant": dict(block_rows=32, blocks=4, num_warps=4),
}
# Crossovers measured on an H100 at K=4096, N=14336 (benchmarks/RESULTS.md).
GEMV_MAX_M = 16  # rows of x up to which a GEMV runs
GEMV_NARROW_MAX_N = 4096  # weight rows up to which the one-row GEMV takes GPU_CONFIG["gemv_narrow"]
FMA_MAX_ROWS = 4  # fp32 x: rows up to which the elementwise multiply-add beats a padded dot
# rows of x from which W is decoded in bands of at most TILE_ROWS output rows to x's dtype and
# multiplied by XLA's dot (cuBLAS): with many rows the in-kernel decode, repeated for every M
# tile, costs more than one decode pass plus a vendor GEMM. The bands run one after another
# (tiled_forward), so one band (<= TILE_ROWS x K in x's dtype, at most half the weight) is alive
# at a time (scratch measured on the H100: 294 MB at M=4096, N=14336 = output + one band).
TILED_MIN_M = 128  # forward: bands 51.9 vs GEMM 57.9 us at M=128, N=14336 (H100, 13:08 UTC)
BWD_TILED_MIN_M = 512  # backward (g @ W): the tiled transposed kernel below this, not re-measured
# ... and from BAND_MIN_M rows for narrow layers (GEMM grid under GEMM_MIN_PROGRAMS tiles):
# N=4096, M=64: bands 16.7 vs GEMM 44.2 us; N=14336 (112 tiles), M=64: GEMM 45.5 vs bands 48.5
BAND_MIN_M = 64
GEMM_MIN_PROGRAMS = 64
# 7168: two bands at N=14336 (4096-row bands: 909 vs 820 us at M=4096, H100)
TILE_ROWS = 7168
# Hopper: rows of x served by the Mosaic GPU wgmma GEMM (``gemm_4bit_wgmma``: the weight decoded in
# registers as wgmma's left operand). H100, N=14336, the kernels of one call (CUPTI, ninth session):
# M=16 27.3 us (Triton split-K GEMV 32.2), M=128 40.4, M=256 71.7, M=512 136, M=1024 232 (Triton /
# bands 119-246); M=4096 899 vs bands 709: bands from 1025 rows
WGMMA_MIN_M = 2
WGMMA_MAX_M = 1024
# ... and only for layers of at least WGMMA_MIN_N rows: each CTA owns 128 of them, so N=4096 gives
# 32 tiles at M <= 128 for 132 SMs (M=16, N=4096: 24.3 us vs 16.1 for the Triton split-K GEMV, same
# H100; N=14336: 112 tiles, 25.4 vs 30.3). Between 4096 and 14336 not measured.
WGMMA_MIN_N = 8192
WGMMA_CONFIG = dict(tile_k=256, stages=4, decode="lut")  # M <= 16 (x tile 16 rows)
WGMMA_CONFIG_WIDE = dict(tile_k=128, stages=3, decode="lut")  # 64/128-row x tiles (shared memory bounds the stages)


def supported(q: quant.Packed4bit) -> bool:
    k = q.shape[1]
    return len(q.shape) == 2 and k % q.blocksize == 0 and k % 2 == 0


def operands(q: quant.Packed4bit, stacked: bool = False) -> dict:
    """Kernel views of the canonical arrays (reshapes and a bitcast only: no copy of W).
    ``stacked``: every array of ``q`` has a leading layer axis (a model's stacked layer tree),
    kept in front of the views."""
    n, k = q.shape
    lead = q.packed.shape[:1] if stacked else ()
    packed = q.packed
    if packed.dtype != jnp.uint8:
        packed = jax.lax.bitcast_convert_type(packed, jnp.uint8)
    ops = dict(packed=packed.reshape(*lead, n, k // 2), absmax=q.absmax.reshape(*lead, n, k // q.blocksize),
               quant_type=q.quant_type, blocksize=q.blocksize)
    if q.double_quant:
        ops.update(nested_absmax=q.nested_absmax.reshape(*lead, -1), offset=q.offset,
                   nested_code=jnp.asarray(q.nested_code, jnp.float32),
                   nested_blocksize=q.nested_blocksize)
    return ops


def reads_stacked(x, q: quant.Packed4bit) -> bool:
    """Whether :func:`forward` with ``layer=`` reads the stacked weight in place (the one-row
    GEMV); other shapes multiply with ``quant.layer_slice`` of it first."""
    return math.prod(x.shape[:-1]) == 1 and _half(x.dtype) and q.blocksize <= 256


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


def _weight_rows(ops, n, block_n_cap, floor=16):
    """Pick block_n dividing N; pad the weight rows only when no power of two >= floor does."""
    bn = _pow2_divisor(n, block_n_cap, floor)
    if bn is None:  # ragged N (not a multiple of 16): pads W's rows (a copy) -- rare in models
        bn = block_n_cap
        ops = dict(ops, packed=_pad_rows(ops["packed"], bn), absmax=_pad_rows(ops["absmax"], bn))
    return ops, bn


def _half(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _gemm_block_m(m: int) -> int:
    """Row tile of the fused GEMM for ``m`` rows: GPU_CONFIG's, or the power of two (>= 16) covering m."""
    return min(GPU_CONFIG["gemm"]["block_m"], max(16, 1 << (m - 1).bit_length()))


def _ordered(a, after):
    """``a``, made to depend on ``after`` (an optimization barrier), so XLA computes what reads
    it only once ``after`` exists."""
    return a if after is None else jax.lax.optimization_barrier((after, a))[1]


def use_bands(m: int, n: int) -> bool:
    """Whether ``m`` rows of x against ``n`` weight rows take the band path (see TILED_MIN_M);
    from BAND_MIN_M rows also when the fused GEMM would launch fewer than GEMM_MIN_PROGRAMS
    output tiles (a narrow layer leaves most SMs idle)."""
    if m >= TILED_MIN_M:
        return True
    programs = -(-m // _gemm_block_m(m)) * -(-n // GPU_CONFIG["gemm"]["block_n"])
    return m >= BAND_MIN_M and programs < GEMM_MIN_PROGRAMS


def forward(x, q, bias=None, *, interpret=False, layer=None):
    """``x @ W.T (+ bias)``: on Hopper the wgmma GEMM for WGMMA_MIN_M..WGMMA_MAX_M rows; else GEMV
    (M <= GEMV_MAX_M), GEMM, or band decode + XLA dot (large M).
    ``layer``: ``q`` is stacked over layers; multiply with that one (see :func:`reads_stacked`)."""
    if layer is not None:
        if not reads_stacked(x, q):
            return forward(x, quant.layer_slice(q, layer), bias, interpret=interpret)
        n, k = q.shape
        y = _gemv(x.reshape(1, k), operands(q, stacked=True), bias, interpret, layer=layer)
        return y.reshape(*x.shape[:-1], n)
    n, k = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if use_wgmma(m, x.dtype, q, interpret):
        return _wgmma_forward(x2, q, bias).reshape(*lead, n)
    if use_bands(m, n):
        return tiled_forward(x2, q, bias, interpret=interpret).reshape(*lead, n)
    ops = operands(q)
    if m == 1 and _half(x.dtype) and q.blocksize <= 256:
        y = _gemv(x2, ops, bias, interpret)
    elif m <= GEMV_MAX_M:
        y = _split_k_gemv(x2, ops, bias, interpret)
    else:
        kh = k // 2
        cfg = dict(GPU_CONFIG["gemm"])
        ops, bn = _weight_rows(ops, n, cfg.pop("block_n"))
        bh = _block_h(kh, cfg.pop("block_h"), q.blocksize // 2)
        cfg.pop("block_m")
        bm = _gemm_block_m(m)
        xp = _pad_rows(x2, bm)
        b = None if bias is None else _pad_rows(bias, bn)
        y = gemm_4bit.fused_forward(xp[:, 0::2], xp[:, 1::2], ops["packed"], ops["absmax"],
                                    **_rest(ops), bias=b, block_m=bm, block_n=bn, block_h=bh,
                                    interpret=interpret, **cfg)
    return y[:m, :n].reshape(*lead, n)


def use_wgmma(m: int, dtype, q: quant.Packed4bit, interpret: bool = False) -> bool:
    """Whether ``m`` rows of ``dtype`` x take the Hopper wgmma GEMM (see WGMMA_MIN_M)."""
    n, k = q.shape
    return (not interpret and WGMMA_MIN_M <= m <= WGMMA_MAX_M and n >= WGMMA_MIN_N and _half(dtype)
            and q.blocksize == 64
            and k % 512 == 0 and n % 128 == 0 and _compat.has_wgmma_kernels())


def _wgmma_tile_n(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


def wgmma_operands(q: quant.Packed4bit, dtype):
    """The wgmma GEMM's views: codes as int32 words [N, K/8] (a bitcast) and the block absmax in
    x's dtype as [N, K/512, 8] (double quantization undone: one XLA fusion a call, 1.8 MB for an
    8B model's largest layer). The kernel rounds the scale to x's dtype anyway (its packed fma),
    so rounding here first gives the same products with half the bytes."""
    n, k = q.shape
    packed = q.packed if q.packed.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(q.packed, jnp.uint8)
    codes = jax.lax.bitcast_convert_type(packed.reshape(n, k // 8, 4), jnp.int32)
    return codes, quant.absmax_4bit(q).astype(dtype).reshape(n, k // 512, 8)


def _wgmma_forward(x2, q, bias):
    m = x2.shape[0]
    tn = _wgmma_tile_n(m)
    cfg = gemm_4bit_wgmma.Config(tile_n=tn, **(WGMMA_CONFIG if tn == 16 else WGMMA_CONFIG_WIDE))
    codes, scales = wgmma_operands(q, x2.dtype)
    xp = gemm_4bit_wgmma.permute_x(_pad_rows(x2, tn))
    y = gemm_4bit_wgmma.matmul(codes, scales, xp, values=gemm_4bit_wgmma.c4.table(q.quant_type), cfg=cfg)[:m]
    # the bias after the 16-bit rounding of the product (the Triton kernels add it in fp32)
    return y if bias is None else (y + bias.astype(y.dtype))


def _gemv(x2, ops, bias, interpret, layer=None):
    """One row of 16-bit x through ``gemv_4bit`` (block dots on the tensor cores for blocksize 64)."""
    k = x2.shape[1]
    n = ops["packed"].shape[-2]
    cfg = dict(GPU_CONFIG["gemv_narrow" if n <= GEMV_NARROW_MAX_N else "gemv"])
    ops, bn = _weight_rows(ops, n, cfg.pop("block_n"), floor=1)  # floor 1: never pads
    blocks = k // ops["blocksize"]
    splits, tb = cfg.pop("splits"), cfg.pop("blocks_per_iter")
    while splits > 1 and blocks % splits:
        splits //= 2
    while tb > 1 and (blocks // splits) % tb:
        tb //= 2
    cfg.update(block_n=bn, blocks_per_iter=tb, splits=splits)
    # the tensor-core engine's chunks are 64-weight blocks; on the GPU it must pass its self-check
    if cfg["engine"] == "mma" and (ops["blocksize"] != 64 or not (interpret or mma_engine_checked(x2.dtype, cfg))):
        cfg["engine"] = "rowsum"
    b = None if bias is None else _pad_rows(bias, bn)
    return gemv_4bit.gemv_4bit(x2, ops["packed"], ops["absmax"], **_rest(ops), bias=b, interpret=interpret,
                               layer=layer, **cfg)


_MMA_CHECKS: dict = {}  # launch shape and decode -> whether the tensor-core GEMV agreed on this GPU
_LAUNCH = ("block_n", "blocks_per_iter", "num_warps", "prefetch", "num_stages")  # what shapes the tile layout


def mma_engine_checked(dtype, cfg) -> bool:
    """Whether the tensor-core GEMV matches the row-sum GEMV for this launch shape on this GPU.

    The mma engine relies on the lane layout Triton gives its weight tile (the layout contract
    in ``pallas_kernels._4bit_common``): a Triton whose layout heuristics differ would make it
    wrong, not slow. So the first call of each launch shape runs both engines once, eagerly,
    on a small random weight; a mismatch or an error warns and keeps the row-sum engine.
    """
    key = (jnp.dtype(dtype).name, *(cfg[k] for k in _LAUNCH), gemv_4bit.c4.MMA_DECODE, gemv_4bit.c4.LUT_COPIES)
    if key not in _MMA_CHECKS:
        try:
            ok, detail = _run_mma_check(dtype, cfg)
        except Exception as e:  # noqa: BLE001 - any failure means: do not trust the engine here
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        if not ok:
            import warnings

            warnings.warn(f"lowbit_jax: the tensor-core 4-bit GEMV failed its self-check for launch {key} "
                          f"({detail}); using the row-sum GEMV", RuntimeWarning, stacklevel=3)
        _MMA_CHECKS[key] = ok
    return _MMA_CHECKS[key]


def _run_mma_check(dtype, cfg, interpret: bool = False):
    """Both engines on one random NF4 + double-quant weight of the launch's tile (4 row tiles,
    2 iterations of K): (agree within 16-bit rounding, max relative difference)."""
    import numpy as np

    bn, tb = cfg["block_n"], cfg["blocks_per_iter"]
    n, k = 4 * bn, 2 * tb * 64
    rng = np.random.default_rng(0)
    launch = {key: cfg[key] for key in _LAUNCH}

    @jax.jit
    def both(x, q):
        ops = operands(q)
        return [gemv_4bit.gemv_4bit(x, ops["packed"], ops["absmax"], **_rest(ops), interpret=interpret,
                                    engine=engine, **launch) for engine in ("mma", "rowsum")]

    with _compat.eager():  # run now, also while a caller's jit is being traced
        w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
        q = quant.quantize_4bit(w, 64, "nf4", compress_statistics=True)
        x = jnp.asarray(rng.standard_normal((1, k)), dtype)
        ys = [np.asarray(y, np.float32) for y in both(x, q)]
    rel = float(np.abs(ys[0] - ys[1]).max() / max(np.abs(ys[1]).max(), 1e-30))
    return bool(np.isfinite(ys[0]).all() and rel < 2e-2), f"max relative difference {rel:.3g}"


def _split_k_gemv(x2, ops, bias, interpret):
    """Few rows: split-K ``gemm_4bit.fused_forward`` (dot mode, x padded to 16 rows; fp32 x
    with <= FMA_MAX_ROWS rows: fma mode, exact select-tree decode)."""
    m, k = x2.shape
    n, kh = ops["packed"].shape
    half_block = ops["blocksize"] // 2
    fma = not _half(x2.dtype) and m <= FMA_MAX_ROWS
    cfg = dict(GPU_CONFIG["gemv_fma" if fma else "gemv_dot"])
    ops, bn = _weight_rows(ops, n, cfg.pop("block_n"))
    bh = _block_h(kh, cfg.pop("block_h"), half_block)
    splits = cfg.pop("splits")
    # splits must cut K/2 into whole byte tiles holding whole quantization blocks
    while splits > 1 and (kh % (splits * bh) or (2 * kh // splits) % ops["blocksize"]):
        splits //= 2
    mp = (1 if m == 1 else 2 if m == 2 else 4) if fma else -(-m // 16) * 16
    xp = _pad_rows(x2, mp)
    b = None if bias is None else _pad_rows(bias, bn)
    parts = gemm_4bit.fused_forward(
        xp[:, 0::2], xp[:, 1::2], ops["packed"], ops["absmax"], **_rest(ops), bias=b if splits == 1 else None,
        block_m=mp if fma else 16, block_n=bn, block_h=bh, splits=splits, mode="fma" if fma else "dot",
        out_dtype=jnp.float32 if splits > 1 else x2.dtype, interpret=interpret, **cfg)
    if splits == 1:
        return parts
    y = jnp.sum(parts, axis=0)
    if b is not None:
        y = y + b.astype(jnp.float32)[None, :]
    return y.astype(x2.dtype)


def _rest(ops):
    """Keyword operands besides the positional packed and absmax."""
    return {key: val for key, val in ops.items() if key not in ("packed", "absmax")}


def backward(g, q, *, interpret=False):
    """``g @ W`` ([..., N] -> [..., K], fp32-accumulated, g's dtype) without expanding W."""
    n, k = q.shape
    lead = g.shape[:-1]
    g2 = g.reshape(-1, n)
    m = g2.shape[0]
    if m >= BWD_TILED_MIN_M:
        return tiled_backward(g2, q, interpret=interpret).reshape(*lead, k)
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


def _bands(q, align):
    """(band rows, number of bands): bands of at most TILE_ROWS rows (a multiple of ``align``),
    at least two for a weight of 2^24 or more elements, so no band is the whole weight."""
    n, k = q.shape
    c = -(-n // TILE_ROWS)
    if c == 1 and n * k >= 1 << 24 and n >= 2 * align:
        c = 2
    per_band = -(-n // c)
    rows = -(-per_band // align) * align
    return rows, -(-n // rows)


def _band_operands(q, align):
    rows, c = _bands(q, align)
    ops = operands(q)
    ops = dict(ops, packed=_pad_rows(ops["packed"], rows * c), absmax=_pad_rows(ops["absmax"], rows * c))
    return ops, rows, c


def _decoded_bands(q, dtype, interpret):
    """(band(c) -> W[c*rows:(c+1)*rows] in dtype, rows, number of bands)."""
    if _half(dtype):
        cfg = dict(GPU_CONFIG["dequant"])
        ops, rows, c = _band_operands(q, cfg["block_rows"])
        blocks = ops["absmax"].shape[1]
        while blocks % cfg["blocks"]:
            cfg["blocks"] //= 2

        def band(i, after=None):
            return dequant_4bit.dequantize_rows(_ordered(ops["packed"], after), ops["absmax"], i * rows, rows=rows,
                                                dtype=dtype, **_rest(ops), interpret=interpret, **cfg)
        return band, rows, c
    # fp32: decode in XLA (exact fp32 code values), band by band
    ops, rows, c = _band_operands(q, 8)
    n, k = q.shape
    absmax = _pad_rows(quant.absmax_4bit(q).reshape(n, k // q.blocksize), rows * c)
    code = jnp.asarray(q.code, jnp.float32)

    def band(i, after=None):
        p = jax.lax.dynamic_slice_in_dim(_ordered(ops["packed"], after), i * rows, rows)
        a = jax.lax.dynamic_slice_in_dim(absmax, i * rows, rows)
        vals = jnp.stack([code[(p >> 4).astype(jnp.int32)], code[(p & 15).astype(jnp.int32)]], -1)
        return (vals.reshape(rows, a.shape[1], q.blocksize) * a[:, :, None]).reshape(rows, k).astype(dtype)
    return band, rows, c


def tiled_forward(x2, q, bias=None, *, interpret=False):
    """``x2 @ W.T`` for many rows: W decoded a band of rows at a time, then XLA's dot.

    The bands are unrolled and their [M, rows] products concatenated once (one copy of the
    output; a scan stacking [C, M, rows] and transposing it made two: 976 vs 820 us at M=4096,
    N=14336 on the H100). Band i's decode waits for band i-1's product, so one decoded band is
    alive at a time; x passes the same barrier, or XLA's dot merger would fuse bands that share
    x into one GEMM over their concatenated decodes (more than one band alive, plus a copy)."""
    n, k = q.shape
    band, rows, c = _decoded_bands(q, x2.dtype, interpret)
    prec = jax.lax.Precision.HIGHEST if x2.dtype == jnp.float32 else None
    outs = []
    for i in range(c):
        after = outs[-1] if outs else None
        # output in x's dtype straight from the GEMM (fp32 accumulation inside), no fp32 pass
        outs.append(jnp.dot(_ordered(x2, after), band(jnp.int32(i), after=after).T, precision=prec))
    y = jnp.concatenate(outs, axis=1)[:, :n]
    if bias is not None:
        y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x2.dtype)
    return y


def tiled_backward(g2, q, *, interpret=False):
    """``g2 @ W`` for many rows, W decoded one band of rows at a time inside a scan."""
    n, k = q.shape
    band, rows, c = _decoded_bands(q, g2.dtype, interpret)
    gc = jnp.moveaxis(jnp.pad(g2, ((0, 0), (0, c * rows - n))).reshape(g2.shape[0], c, rows), 1, 0)
    prec = jax.lax.Precision.HIGHEST if g2.dtype == jnp.float32 else None

    def step(acc, chunk):
        i, g = chunk
        return acc + jnp.dot(g, band(i), precision=prec, preferred_element_type=jnp.float32), None

    acc, _ = jax.lax.scan(step, jnp.zeros((g2.shape[0], k), jnp.float32),
                          (jnp.arange(c, dtype=jnp.int32), gc))
    return acc.astype(g2.dtype)
