"""The tensor-core one-row GEMV: its inline PTX run lane by lane on a CPU warp emulator.

``_4bit_common.mma_rowsum_asm`` relies on a lane layout (lane ``(g, t)`` holds chunk ``t`` of
block ``g``) and on the m16n8k16 fragment layout. The emulator executes the PTX for all 32
lanes with the ISA's fragment mapping, so these tests check that the sum of each lane group's
outputs is its block's dot product for every byte value, both code tables and both 16-bit
dtypes; the interpreted kernel (``interpret=True``) is checked against the reference in
test_kernels_4bit.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ptx_emulator import run_warp
from lowbit_jax import quant
from lowbit_jax.ops import _matmul_4bit_kernels as kern
from lowbit_jax.ops import matmul_4bit_reference
from pallas_kernels import _4bit_common as c4
from pallas_kernels import gemv_4bit


def _bits(v: float) -> int:
    return int(np.float32(v).view(np.uint32))


def _pairs(x) -> np.ndarray:
    u = np.asarray(x).view(np.uint16).astype(np.uint32).reshape(*x.shape[:-1], -1, 2)
    return u[..., 0] | (u[..., 1] << 16)


def _lane_data(blocks, xpairs, scales, acc, base=0) -> list[dict[str, int]]:
    """Registers of the 32 lanes in the kernel tile's layout: lane (g, t) holds chunk t (bytes
    8t..8t+7) of block g: its two words, their x pairs, block g's scale (8 copies), the
    lane's 8 accumulator values and the byte table's address (8 copies)."""
    lanes = []
    for ln in range(32):
        g, t = ln // 4, ln % 4
        byts = blocks[g, 8 * t: 8 * t + 8]
        regs = {"$8": int(byts[:4].view("<u4")[0]), "$9": int(byts[4:].view("<u4")[0])}
        regs.update({f"${10 + j}": int(xpairs[g, 8 * t + j]) for j in range(8)})
        regs.update({f"${18 + j}": _bits(scales[g]) for j in range(8)})
        regs.update({f"${26 + j}": _bits(acc[ln, j]) for j in range(8)})
        regs.update({f"${34 + j}": base for j in range(8)})
        lanes.append(regs)
    return lanes


def _filled_table(values, ndt, num_threads=128):
    """Shared memory after the whole CTA ran the table fill, and the address it returned."""
    shared = {}
    threads = run_warp(c4.lut_fill_asm(values, ndt, num_threads), [{"$1": 0}] * num_threads, shared=shared)
    assert len({th["$0"] for th in threads}) == 1
    return shared, threads[0]["$0"]


@pytest.mark.parametrize("copies", [32, 8])
@pytest.mark.parametrize("num_threads", [32, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lut_fill_writes_every_byte_pair_in_every_copy(quant_type, dtype, num_threads, copies, monkeypatch):
    monkeypatch.setattr(c4, "LUT_COPIES", copies)
    ndt = jnp.dtype(dtype)
    values = c4.table(quant_type)
    bits = np.asarray(np.asarray(values, np.float32).astype(ndt).view(np.uint16), np.int64)
    shared, base = _filled_table(values, ndt, num_threads)
    assert len(shared) == c4.LUT_ENTRIES * c4.LUT_COPIES
    for byte in range(256):
        want = int(bits[byte >> 4] | (bits[byte & 15] << 16))  # (high nibble, low nibble): x's order
        got = {shared[base + 4 * copies * byte + 4 * copy] for copy in range(copies)}
        assert got == {want}, (byte, got, want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lut_scaled_pairs_asm_decodes_and_scales_every_byte(quant_type, dtype):
    """The dot kernels' decode: each byte's two values from the table, times the block's scale,
    rounded as ``decode_scaled`` says (the interpreter's emulation is checked against it too)."""
    rng = np.random.default_rng(3)
    ndt = jnp.dtype(dtype)
    values = c4.table(quant_type)
    shared, base = _filled_table(values, ndt)
    asm = c4.lut_scaled_pairs_asm(ndt)
    byts = rng.permutation(256).astype(np.uint8).reshape(64, 4)  # every byte value once
    scales = rng.uniform(0.01, 3.0, 64).astype(np.float32)
    inputs = [{"$4": int(byts[i].view("<u4")[0]), **{f"${5 + j}": _bits(scales[i]) for j in range(4)},
               **{f"${9 + j}": base for j in range(4)}} for i in range(64)]
    lanes = run_warp(asm, inputs, shared=shared)
    got = np.array([[lanes[i][f"${j}"] for j in range(4)] for i in range(64)], np.uint32)
    hi, lo = c4.decode_scaled(jnp.asarray(byts), jnp.asarray(np.repeat(scales[:, None], 4, 1)), None, values, ndt,
                              interpret=True)
    want = np.stack([np.asarray(hi, np.float32), np.asarray(lo, np.float32)], -1).astype(ndt).view(np.uint16)
    np.testing.assert_array_equal(got & 0xFFFF, want[..., 0])
    np.testing.assert_array_equal(got >> 16, want[..., 1])


def test_lut_fill_rejects_thread_counts_that_do_not_divide_the_table():
    with pytest.raises(ValueError, match="threads"):
        c4.lut_fill_asm(c4.NF4, jnp.bfloat16, 96)


@pytest.mark.parametrize("decode,copies", [("lut", 32), ("lut", 8), ("prmt", 32)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_mma_asm_block_sums(quant_type, dtype, decode, copies, monkeypatch):
    monkeypatch.setattr(c4, "MMA_DECODE", decode)
    monkeypatch.setattr(c4, "LUT_COPIES", copies)
    rng = np.random.default_rng(7)
    ndt = jnp.dtype(dtype)
    values = c4.table(quant_type)
    table = np.asarray(np.asarray(values, np.float32).astype(ndt), np.float64)
    asm = c4.mma_rowsum_asm(values, ndt)
    shared, base = _filled_table(values, ndt) if decode == "lut" else ({}, 0)
    for trial in range(2):
        # 8 blocks of 32 bytes: every byte value once over the 256 bytes, shuffled
        blocks = rng.permutation(256).astype(np.uint8).reshape(8, 32)
        x = rng.standard_normal((8, 64)).astype(np.float32).astype(ndt)
        scales = rng.uniform(0.5, 2.0, 8).astype(np.float32)
        acc = rng.standard_normal((32, 8)).astype(np.float32)
        lanes = run_warp(asm, _lane_data(blocks, _pairs(x), scales, acc, base), half_dtype=np.dtype(ndt).type,
                         shared=shared)
        out = np.array([[np.uint32(lanes[ln][f"${i}"]).view(np.float32) for i in range(8)] for ln in range(32)],
                       np.float64)
        added = (out - acc).reshape(8, 32)  # [block, its 4 lanes x 8 values]
        w = np.stack([table[blocks >> 4], table[blocks & 15]], axis=-1).reshape(8, 64)
        want = (w * np.asarray(x, np.float64)).sum(axis=1) * scales
        np.testing.assert_allclose(added.sum(axis=1), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        # one value of each block takes the product (lane (g, g // 2)); the others pass through
        assert (np.count_nonzero(added, axis=1) <= 1).all()


@pytest.mark.parametrize("k,n,quant_type,dq,dtype,cfg", [
    (512, 32, "nf4", True, "bfloat16", dict(block_n=8, blocks_per_iter=4)),
    (512, 32, "fp4", False, "float16", dict(block_n=4, blocks_per_iter=2, splits=2)),
    (1024, 16, "nf4", False, "bfloat16", dict(block_n=16, blocks_per_iter=16, prefetch=False)),
])
def test_mma_engine_interpreted_matches_reference(rng, k, n, quant_type, dq, dtype, cfg):
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = quant.quantize_4bit(jnp.asarray(w), quant_type=quant_type, blocksize=64, compress_statistics=dq)
    x = jnp.asarray(rng.standard_normal((1, k)), dtype)
    bias = jnp.asarray(rng.standard_normal((n,)), dtype)
    ops = kern.operands(q)
    rest = {key: v for key, v in ops.items() if key not in ("packed", "absmax")}
    args = (x, ops["packed"], ops["absmax"])
    y = gemv_4bit.gemv_4bit(*args, **rest, bias=bias, interpret=True, engine="mma", **cfg)
    y_rows = gemv_4bit.gemv_4bit(*args, **rest, bias=bias, interpret=True, engine="rowsum", **cfg)
    ref = np.asarray(matmul_4bit_reference(x, q, bias), np.float64)
    tol = {"bfloat16": 1e-2, "float16": 2e-3}[dtype]
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= tol * np.abs(ref).max()
    assert np.abs(np.asarray(y, np.float64) - np.asarray(y_rows, np.float64)).max() <= tol * np.abs(ref).max()


def test_mma_engine_rejects_other_blocksizes(rng):
    q = quant.quantize_4bit(jnp.asarray(rng.standard_normal((16, 512)), jnp.float32), blocksize=128)
    ops = kern.operands(q)
    rest = {key: v for key, v in ops.items() if key not in ("packed", "absmax")}
    x = jnp.ones((1, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="blocksize 64"):
        gemv_4bit.gemv_4bit(x, ops["packed"], ops["absmax"], **rest, engine="mma", interpret=True)
    with pytest.raises(ValueError, match="engine"):
        gemv_4bit.gemv_4bit(x, ops["packed"], ops["absmax"], **rest, engine="tensor", interpret=True)


def test_mma_self_check_runs_both_engines_interpreted():
    """The check runs eagerly, also from inside a jit trace (where matmul_4bit calls it)."""
    cfg = dict(kern.GPU_CONFIG["gemv"], block_n=4, blocks_per_iter=2)
    seen = []

    @jax.jit
    def step(x):
        seen.append(kern._run_mma_check(jnp.bfloat16, cfg, interpret=True))
        return x + 1

    step(jnp.ones(3))
    ok, detail = seen[0]
    assert ok, detail


@pytest.mark.parametrize("failure", ["mismatch", "error"])
def test_mma_self_check_failure_keeps_rowsum(monkeypatch, failure):
    """A launch shape whose check fails (wrong numbers or an exception) warns once and is not
    used again; the cache is per launch shape and dtype."""
    calls = []

    def fake_check(dtype, cfg, interpret=False):
        calls.append((jnp.dtype(dtype).name, cfg["block_n"]))
        if failure == "error":
            raise RuntimeError("no such layout")
        return False, "max relative difference 1"

    monkeypatch.setattr(kern, "_run_mma_check", fake_check)
    monkeypatch.setattr(kern, "_MMA_CHECKS", {})
    cfg = dict(kern.GPU_CONFIG["gemv"])
    with pytest.warns(RuntimeWarning, match="self-check"):
        assert kern.mma_engine_checked(jnp.bfloat16, cfg) is False
    assert kern.mma_engine_checked(jnp.bfloat16, cfg) is False  # cached: no second run, no warning
    monkeypatch.setattr(kern, "_run_mma_check", lambda dtype, cfg, interpret=False: (True, ""))
    assert kern.mma_engine_checked(jnp.float16, cfg) is True  # another dtype is checked on its own
    assert calls == [("bfloat16", cfg["block_n"])]
