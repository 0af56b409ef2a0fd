"""4-bit (NF4/FP4) GEMM on Hopper's wgmma through Mosaic GPU: ``y = x @ W.T``, computed as
``W @ x.T`` with W decoded on chip (never in HBM).

Why a second GEMM beside the Triton one (``gemm_4bit``): wgmma can take its left operand from
registers, so a weight tile decoded in registers feeds the tensor cores without a trip through
shared memory, while x's tile (the right operand) arrives by TMA; a separate warpgroup issues
the copies (warp specialization), so loads overlap the decode and the math. Triton's lowering
gives no control over which thread holds which decoded value; Mosaic GPU does, and that is
what makes the decode free of layout shuffles:

* wgmma's register operand gives thread (group g, lane-in-quad t) of a warp rows g and g+8 and,
  in every 8-column tile c, the column pair (8c + 2t, 8c + 2t + 1). A thread loads 16
  contiguous bytes of each of its rows (``WGMMA_LAYOUT_8BIT`` on the codes viewed as int32:
  one 16-byte shared-memory read a row, a warp reads 512 contiguous bytes) and the pair from its
  byte p becomes its register for column tile p. The byte's two codes are physical columns
  ``32t + 2p, 32t + 2p + 1`` of the 128-column chunk, the register's logical columns are
  ``8p + 2t, 8p + 2t + 1``: the product is the same if x's columns are put in the same order,
  which :func:`permute_x` does once outside the kernel (x is small next to W at the sizes this
  kernel serves; at large M it is one copy of x).
* A thread's 16 bytes lie in one quantization block of 64 (32t..32t+31 of the chunk), so one
  scale per row and chunk: the decoded pairs are multiplied by it in the decode PTX (one packed
  fma a pair) before the mma; the accumulator then sums over all of K in fp32.
* The epilogue writes each warpgroup's tile transposed into shared memory and copies it to
  ``y [M, N]`` by TMA, so the caller gets ``x @ W.T`` directly.

The decode reads ``_4bit_common``'s byte table (entry b = byte b's two code values as one pair,
32 copies so a warp's reads never conflict): each compute warpgroup fills its own 32 KB table in
shared memory once per kernel (``decode="prmt"``: the byte-permute PTX instead, 22 integer
instructions per 8 codes). The scales are the absmax ``[N, K/64]`` in x's dtype (double
quantization undone and rounded by XLA: one elementwise fusion, 1.8 MB for an 8B model's largest
layer) viewed ``[N, K/512, 8]``, so a tile's are 16-byte rows, one TMA box a step. (Undoing the
double quantization in the kernel instead, from the uint8 codes, was slower: 18.1 vs 16.1 us at
M=16, see benchmarks/KERNEL_NOTES.md.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _4bit_common as c4

CHUNK = 128  # K columns of a thread's 16-byte row piece (4 threads x 16 bytes x 2 codes)


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch shape: ``tile_m`` weight rows per compute warpgroup (two per CTA), ``tile_n`` rows
    of x, ``tile_k`` columns a pipeline step, ``stages`` steps in flight.

    Tried and removed: four compute warpgroups, two a row slab taking alternate K steps and
    handing one accumulator to the other through shared memory (more warps to hide the decode's
    latency at small M): it hung on the H100 (probe 2026-11-24, not debugged)."""
    tile_m: int = 64
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    decode: str = "lut"  # "lut": a byte table in shared memory (one per compute warpgroup); "prmt"
    grid_minor_n: bool = True
    grid_tile_width: int = 1


def permute_x(x):
    """x's columns in the kernel's K order: column ``128q + 8p + 2t + e`` holds ``128q + 32t + 2p + e``."""
    *lead, k = x.shape
    if k % CHUNK:
        raise ValueError(f"x: K={k} must be a multiple of {CHUNK}")
    return x.reshape(*lead, k // CHUNK, 4, 16, 2).swapaxes(-3, -2).reshape(*lead, k)


def decode_asm(values, dtype, method: str = "lut") -> str:
    """PTX: ``$4`` = one 32-bit word of packed codes, ``$5`` = the block's scale in x's 16-bit
    dtype, in both halves -> ``$0..$3`` = byte j's (high-nibble, low-nibble) values times the
    scale (one packed fma with -0.0 a pair: the code value and the product each rounded to the
    dtype, as ``_4bit_common.lut_scaled_pairs_asm``).

    ``method="lut"``: ``$6`` = this lane's copy of the byte table (``_4bit_common``'s 256
    entries x 32 copies: base + 4 * lane), one prmt + mad + shared-memory read a byte (4 integer
    instructions per 8 codes); "prmt": the table in registers, 22 (``_decode_pairs_ptx``)."""
    ty = c4._ptx_half(dtype)
    if method == "lut":
        regs = " .reg .b32 t, lb, q0, q1, q2, q3, nz;\n mov.b32 lb, $6;\n"
    elif method == "prmt":
        regs = (" .reg .b32 v, s23, i01, i23, m01, m23, a, b, lo, hi, q0, q1, q2, q3, nz;\n"
                " .reg .b32 L0, L1, L2, L3, H0, H1, H2, H3;\n" + c4._table_consts_ptx(values, dtype))
    else:
        raise ValueError(f"decode must be 'lut' or 'prmt', got {method!r}")
    return ("{\n" + regs + " mov.b32 nz, 0x80008000;\n"
            + c4._decode_pairs_ptx("$4", ("q0", "q1", "q2", "q3"), method=method)
            + "".join(f" fma.rn.{ty}x2 ${j}, q{j}, $5, nz;\n" for j in range(4)) + "}")


LUT_WORDS = c4.LUT_ENTRIES * 32  # one compute warpgroup's byte table (32 copies: conflict-free reads)


def _lut_fill_fn(values, dtype):
    """Mosaic GPU body filling a warpgroup's byte table (int32 ``[LUT_WORDS]`` in shared memory)
    with ``_4bit_common.lut_fill_asm`` (128 fillers, conflict-free stores), then the warpgroup's
    barrier: each compute warpgroup fills and reads its own table, so no cross-warpgroup sync."""
    if c4.LUT_COPIES != 32:
        raise ValueError("the wgmma GEMM's table has 32 copies")
    asm = c4.lut_fill_asm(values, dtype, 128, base="$0", tid="$1")

    def fn(_ctx, lut_ref):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm
        from jax.experimental.mosaic.gpu import utils as mu

        i32 = ir.IntegerType.get_signless(32)
        base = llvm.ptrtoint(i32, mu.memref_ptr(lut_ref))
        tid = arith.remui(mu.thread_idx(), arith.constant(i32, 128))
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [base, tid], asm, "r,r", has_side_effects=True)
        mu.warpgroup_barrier()

    return fn


def _decode_fn(values, dtype, rows: int, tile_k: int, method: str):
    """The Mosaic GPU body (for ``plgpu.inline_mgpu``) decoding one warpgroup's ``[rows, tile_k]``
    weight tile from its codes (int32 ``[rows, tile_k / 8]`` in shared memory) and scales in x's
    dtype (``[rows, tile_k / 64]``) into wgmma's register layout."""
    asm = decode_asm(values, dtype, method)

    def fn(_ctx, codes_ref, scales_ref, lut_ref=None):
        import jax.experimental.mosaic.gpu as mgpu
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
        from jax.experimental.mosaic.gpu import fragmented_array as fa
        from jax.experimental.mosaic.gpu import utils as mu

        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        index = ir.IndexType.get()
        c = lambda v: arith.constant(i32, v)
        words = mgpu.FragmentedArray.load_untiled(codes_ref, layout=fa.WGMMA_LAYOUT_8BIT, is_signed=False,
                                                  optimized=False)
        wshape = words.registers.shape
        if wshape != (1, tile_k // CHUNK, 1, 1, 2, 1, 1, 1, 1):
            raise NotImplementedError(f"unexpected code register shape {wshape}")
        oshape = fa.WGMMA_LAYOUT.registers_shape((rows, tile_k))
        if oshape != (1, tile_k // 8, 1, 1, 2, 1, 1, 1, 1):
            raise NotImplementedError(f"unexpected wgmma register shape {oshape}")
        tid = mu.thread_idx()
        lane = arith.remui(tid, c(32))
        warp = arith.remui(arith.divui(tid, c(32)), c(4))
        g, t = arith.divui(lane, c(4)), arith.remui(lane, c(4))
        row0 = arith.addi(arith.muli(warp, c(16)), g)
        half_t = arith.divui(t, c(2))
        st = llvm.StructType.get_literal([i32] * 4)
        extra, cons = [], "=r,=r,=r,=r,r,r"
        if method == "lut":  # this lane's copy: base + 4 * lane
            extra = [arith.addi(llvm.ptrtoint(i32, mu.memref_ptr(lut_ref)), arith.muli(lane, c(4)))]
            cons += ",r"
        pair_ty = ir.VectorType.get((2,), mu.dtype_to_ir_type(jnp.dtype(dtype)))
        regs = np.empty(oshape, dtype=object)
        for u in range(tile_k // CHUNK):
            blk = arith.index_cast(index, arith.addi(half_t, c(2 * u)))
            for h in range(2):
                row = arith.index_cast(index, arith.addi(row0, c(8 * h)))
                s16 = arith.extui(i32, mu.bitcast(memref.load(scales_ref, [row, blk]), i16))
                sbits = arith.ori(s16, arith.shli(s16, c(16)))  # the scale in both halves
                vec = words.registers[0, u, 0, 0, h, 0, 0, 0, 0]
                for j in range(4):
                    w = vector.extract(vec, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([j]))
                    res = llvm.inline_asm(st, [w, sbits, *extra], asm, cons)
                    for b in range(4):
                        r = llvm.extractvalue(i32, res, [b])
                        regs[0, 16 * u + 4 * j + b, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(r, pair_ty)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return fn


OUT_SWIZZLE = 128  # bytes: one 64-row line of the transposed output tile (16-bit y)


def _store_t_fn():
    """Mosaic GPU body writing a warpgroup's ``[64, cols]`` result tile (wgmma layout) transposed
    into a ``[cols, 64]`` shared-memory tile that is tiled (8, 64) and 128-byte swizzled, which the
    TMA copy to ``y`` un-swizzles. Why swizzled: the 64 weight rows of one x row are a 128-byte
    line, so unswizzled the 4 lines a warp's store touches start on the same bank (4-way
    conflicts); with 16-byte chunk ``c`` of line ``r`` stored at ``c ^ (r % 8)`` they do not."""

    def fn(_ctx, arr, ref):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, memref, vector
        from jax.experimental.mosaic.gpu import utils as mu

        i32 = ir.IntegerType.get_signless(32)
        index = ir.IndexType.get()
        c = lambda v: arith.constant(i32, v)
        ix = lambda v: arith.index_cast(index, v)
        tid = mu.thread_idx()
        lane = arith.remui(tid, c(32))
        warp = arith.remui(arith.divui(tid, c(32)), c(4))
        g, t = arith.divui(lane, c(4)), arith.remui(lane, c(4))
        zero = ix(c(0))
        for idx, reg in np.ndenumerate(arr.registers):
            ct, h = idx[1], idx[4]
            chunk = arith.addi(arith.muli(warp, c(2)), c(h))  # (16 warp + 8 h + g) // 8
            for e in range(2):
                v = vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([e]))
                line = arith.addi(arith.muli(t, c(2)), c(e))  # x row 8 ct + 2t + e, mod 8
                col = arith.addi(arith.muli(arith.xori(chunk, line), c(8)), g)
                memref.store(v, ref, [ix(c(ct)), zero, ix(line), ix(col)])

    return fn


def matmul(codes, scales, xp, *, values, cfg: Config = Config(), num_sms: int | None = None):
    """``y`` [M, N] = x @ decode(W).T, computed as decode(W) @ x.T and stored transposed.

    codes: int32 [N, K/8] (the canonical packed bytes viewed 4 to a word); scales: [N, K/512, 8]
    in x's dtype (each block's absmax, double quantization undone, rounded to x's dtype: the
    [N, K/64] layout viewed so that a tile's scales are 16-byte TMA rows); xp: [M, K] x's rows in
    the kernel's K order (:func:`permute_x`), 16-bit. N must be a multiple of 2 * tile_m, M of tile_n, K of tile_k
    (the caller pads); tile_k 128 or 256.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n, kw = codes.shape
    m, k = xp.shape
    dtype = xp.dtype
    if codes.dtype != jnp.int32 or kw * 8 != k:
        raise ValueError(f"codes: expected int32 [N, {k // 8}], got {codes.dtype} {codes.shape}")
    if k % 512 or scales.shape != (n, k // 512, 8) or scales.dtype != dtype:
        raise ValueError(f"scales: expected {jnp.dtype(dtype).name} {(n, k // 512, 8)} (K a multiple of 512), "
                         f"got {scales.dtype} {scales.shape}")
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    if tm != 64:
        raise ValueError("tile_m must be 64 (one wgmma row block a warpgroup)")
    if jnp.dtype(dtype).itemsize != 2:
        raise ValueError(f"xp: expected 16-bit x, got {dtype}")
    cta_m = 2 * tm
    if tk not in (128, 256):
        raise ValueError(f"tile_k must be 128 or 256, got {tk}")
    if n % cta_m or m % tn or k % tk:
        raise ValueError(f"shape N={n}, M={m}, K={k} does not tile by ({cta_m}, {tn}, {tk})")
    if num_sms is None:
        num_sms = jax.devices()[0].core_count if jax.default_backend() == "gpu" else 132
    m_iters, n_iters, k_iters = n // cta_m, m // tn, k // tk
    bits = jnp.dtype(dtype).itemsize * 8
    x_swizzle = plgpu.find_swizzle(tk * bits, "rhs")
    x_transforms = (plgpu.TilingTransform((8, x_swizzle * 8 // bits)), plgpu.SwizzleTransform(x_swizzle))
    epi_n = min(64, tn)
    lut = cfg.decode == "lut"
    decode = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(),) * (3 if lut else 2),
        return_type=plgpu.ShapeDtypeStruct((tm, tk), dtype, layout=plgpu.Layout.WGMMA),
    )(_decode_fn(values, dtype, tm, tk, cfg.decode))
    fill = plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))(_lut_fill_fn(values, dtype))
    out_transforms = (plgpu.TilingTransform((8, OUT_SWIZZLE * 8 // bits)), plgpu.SwizzleTransform(OUT_SWIZZLE))
    store_t = plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(transforms=out_transforms)))(_store_t_fn())

    def kernel(codes_gmem, scales_gmem, x_gmem, out_gmem, out_smem, lut_smem):
        def get_pipeline(body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(k_iters,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((cta_m, tk // 8), lambda kk: (0, kk), memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((cta_m, 1, 8), lambda kk: (0, kk * tk // 512, 0), memory_space=plgpu.SMEM),
                    plgpu.BlockSpec((tn, tk), lambda kk: (0, kk), transforms=x_transforms,
                                    memory_space=plgpu.SMEM),
                ],
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=cfg.stages,
                compute_context=compute_context,
            )

        ignore = lambda *_, **__: None

        @functools.partial(pl.run_scoped,
                           pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(
                               codes_gmem, scales_gmem, x_gmem),
                           collective_axes="wg")
        def _scope(pipeline_allocs):
            wg = lax.axis_index("wg")
            if lut:
                for r in range(2):  # the compute warpgroups (the copies run in the last one)
                    pl.when(wg == r)(lambda r=r: fill(lut_smem.at[r]))

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tiles(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_n else 0,
                                            cfg.grid_tile_width)
                m_sl = pl.ds(mi * cta_m, cta_m)
                n_sl = pl.ds(ni * tn, tn)
                wg_sl = pl.ds(wg * tm, tm)

                def emit(acc, r):
                    """The row slab r's result: cast, transposed into shared memory, TMA to y."""
                    out = acc.astype(dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for ej in range(tn // epi_n):
                        slot = ej % 2
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        store_t(out[:, ej * epi_n:(ej + 1) * epi_n], out_smem.at[r, slot])
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[r, slot],
                            out_gmem.at[n_sl, m_sl].at[pl.ds(ej * epi_n, epi_n), pl.ds(r * tm, tm)])

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...]
                        for r in range(2):
                            pl.when(wg == r)(functools.partial(emit, acc, r))

                def mma_body(idxs, codes_smem, scales_smem, x_smem, acc_ref):
                    # this step's tk / 64 scales of the 8 in the tile's 16-byte row
                    first = (idxs[0] % (512 // tk)) * (tk // 64)
                    refs = (codes_smem.at[wg_sl], scales_smem.at[wg_sl, 0, pl.ds(first, tk // 64)])
                    a = decode(*refs, lut_smem.at[wg]) if lut else decode(*refs)
                    plgpu.wgmma(acc_ref, a, x_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref

                get_pipeline(mma_body, compute_context)(
                    codes_gmem.at[m_sl, :], scales_gmem.at[m_sl], x_gmem.at[n_sl, :],
                    allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    slots = min(2, tn // epi_n)
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=dict(out_smem=plgpu.SMEM((2, slots, epi_n, tm), dtype, transforms=out_transforms),
                           lut_smem=plgpu.SMEM((2, LUT_WORDS) if lut else (1, 4), jnp.int32)),
    )
    return f(codes, scales, xp)
