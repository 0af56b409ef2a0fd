"""The Hopper wgmma 4-bit GEMM (``pallas_kernels.gemm_4bit_wgmma``) on the CPU.

The kernel itself needs an H100 (``benchmarks/probe_wgmma_4bit.py`` and ``bench_matmul_4bit.py
--check`` compare it with the jnp reference there). What can be checked here, and is where a
mistake would hide: (1) the K order contract, i.e. that the register each thread builds from
its 16 bytes, placed where wgmma's register layout says its logical columns are, times x in
``permute_x`` order, is the product with the canonical weight; (2) the decode PTX, run on the
warp emulator for every byte value, both tables and both 16-bit dtypes; (3) that the kernel
builds and lowers (the Mosaic GPU module is produced on the CPU) for the launch shapes the
dispatch uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _ptx_emulator import run_warp
from lowbit_jax import quant
from lowbit_jax.ops import _matmul_4bit_kernels as kern
from pallas_kernels import _4bit_common as c4
from pallas_kernels import gemm_4bit_wgmma as gw


def _logical_tile(w: np.ndarray) -> np.ndarray:
    """The weight tile as the kernel's registers hold it, in logical K order: thread t of a row's
    quad builds its register for column tile ``16u + 4j + b`` from byte ``b`` of word ``j`` of its
    16 bytes in chunk u (physical bytes ``64u + 16t + 4j + b``); wgmma's register layout puts that
    register's two values at logical columns ``8c + 2t`` and ``8c + 2t + 1``."""
    rows, k = w.shape
    out = np.full_like(w, np.nan)
    for u in range(k // gw.CHUNK):
        for t in range(4):
            for j in range(4):
                for b in range(4):
                    byte = 64 * u + 16 * t + 4 * j + b
                    col_tile = 16 * u + 4 * j + b
                    for e in range(2):
                        out[:, 8 * col_tile + 2 * t + e] = w[:, 2 * byte + e]
    return out


def test_permute_x_matches_register_order():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3 * gw.CHUNK))
    x = rng.standard_normal((5, 3 * gw.CHUNK)).astype(np.float32)  # JAX's default float width: exact
    a = _logical_tile(w)
    assert not np.isnan(a).any()  # every logical column is some byte's value
    xp = np.asarray(gw.permute_x(jnp.asarray(x))).astype(np.float64)
    np.testing.assert_allclose(xp @ a.T, x @ w.T, rtol=1e-12, atol=1e-12)
    assert not np.allclose(x @ a.T, x @ w.T)  # the permutation is not the identity


def test_permute_x_rejects_ragged_k():
    with pytest.raises(ValueError, match="multiple of 128"):
        gw.permute_x(jnp.zeros((2, 192), jnp.bfloat16))


@pytest.mark.parametrize("method", ["lut", "prmt"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decode_asm_every_byte(dtype, quant_type, method):
    values = c4.table(quant_type)
    ndt = np.dtype(jnp.dtype(dtype))
    rng = np.random.default_rng(1)
    byts = np.arange(256, dtype=np.uint8)
    words = byts.view("<u4")
    scales32 = rng.uniform(0.01, 3.0, size=words.shape[0]).astype(np.float32)
    scales = scales32.astype(ndt)  # the kernel's scales are in x's dtype
    shared: dict = {}
    if method == "lut":  # a warpgroup's 128 threads fill the table the kernel gives them (at address 0)
        run_warp(c4.lut_fill_asm(values, ndt, 128, base="$0", tid="$1"), [{"$0": 0, "$1": i} for i in range(128)],
                 shared=shared)
        assert len(shared) == gw.LUT_WORDS
    sbits = scales.view(np.uint16).astype(np.uint32)
    lanes = [{"$4": int(wd), "$5": int(sb | (sb << 16)), "$6": 4 * (i % 32)} for i, (wd, sb) in enumerate(zip(words, sbits))]
    out = run_warp(gw.decode_asm(values, dtype, method), lanes, half_dtype=ndt, shared=shared)
    vals = np.asarray(values, np.float32).astype(ndt).astype(np.float32)
    for i, regs in enumerate(out):
        s = np.float32(scales[i])
        for j in range(4):
            byte = int(byts[4 * i + j])
            got = np.array([regs[f"${j}"]], np.uint32).view(np.uint16).view(ndt).astype(np.float32)
            want = (np.array([vals[byte >> 4], vals[byte & 15]], np.float32) * s).astype(ndt).astype(np.float32)
            np.testing.assert_array_equal(got, want, err_msg=f"byte {byte:#04x}")


@pytest.mark.parametrize("tile_n,tile_k,decode", [(16, 256, "lut"), (128, 128, "lut"), (16, 128, "prmt")])
def test_kernel_lowers_for_cuda(tile_n, tile_k, decode):
    n, k = 256, 512
    cfg = gw.Config(tile_n=tile_n, tile_k=tile_k, stages=3, decode=decode)
    f = jax.jit(lambda c, s, x: gw.matmul(c, s, x, values=c4.NF4, cfg=cfg, num_sms=132))
    lowered = f.trace(jax.ShapeDtypeStruct((n, k // 8), jnp.int32), jax.ShapeDtypeStruct((n, k // 512, 8), jnp.bfloat16),
                      jax.ShapeDtypeStruct((tile_n, k), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_operand_checks():
    codes = jnp.zeros((256, 64), jnp.int32)
    scales = jnp.ones((256, 1, 8), jnp.bfloat16)
    x = jnp.zeros((16, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="scales"):
        gw.matmul(codes, scales.astype(jnp.float32), x, values=c4.NF4, num_sms=132)
    with pytest.raises(ValueError, match="codes"):
        gw.matmul(codes.astype(jnp.uint32), scales, x, values=c4.NF4, num_sms=132)
    with pytest.raises(ValueError, match="does not tile"):
        gw.matmul(codes, scales, x[:5], values=c4.NF4, num_sms=132, cfg=gw.Config(tile_n=16))
    with pytest.raises(ValueError, match="tile_k"):
        gw.matmul(codes, scales, x, values=c4.NF4, num_sms=132, cfg=gw.Config(tile_n=16, tile_k=512))


def test_operands_views_match_the_canonical_arrays():
    w = jax.random.normal(jax.random.key(3), (128, 512), jnp.float32)
    q = quant.quantize_4bit(w, compress_statistics=True)
    codes, scales = kern.wgmma_operands(q, jnp.bfloat16)
    packed = np.asarray(q.packed).reshape(128, 256)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8).reshape(128, 256), packed)
    want = np.asarray(quant.absmax_4bit(q).astype(jnp.bfloat16).astype(jnp.float32)).reshape(128, 8)
    np.testing.assert_array_equal(np.asarray(scales.astype(jnp.float32)).reshape(128, 8), want)


def test_dispatch_stays_off_the_cpu():
    q = quant.quantize_4bit(jnp.ones((128, 256), jnp.float32))
    assert not kern.use_wgmma(16, jnp.bfloat16, q)


def test_dispatch_rules_on_hopper(monkeypatch):
    """Which shapes take the wgmma GEMM where it can run (the measured crossovers)."""
    from lowbit_jax import _compat

    monkeypatch.setattr(_compat, "has_wgmma_kernels", lambda: True)
    wide = quant.quantize_4bit(jnp.ones((kern.WGMMA_MIN_N, 512), jnp.float32))
    narrow = quant.quantize_4bit(jnp.ones((4096, 512), jnp.float32))
    assert kern.use_wgmma(16, jnp.bfloat16, wide) and kern.use_wgmma(kern.WGMMA_MAX_M, jnp.float16, wide)
    assert not kern.use_wgmma(1, jnp.bfloat16, wide)  # the one-row GEMV
    assert not kern.use_wgmma(kern.WGMMA_MAX_M + 1, jnp.bfloat16, wide)  # the bands
    assert not kern.use_wgmma(16, jnp.float32, wide)
    assert not kern.use_wgmma(16, jnp.bfloat16, narrow)  # too few 128-row tiles for the SMs
    assert not kern.use_wgmma(16, jnp.bfloat16, wide, interpret=True)


def test_dispatch_needs_k_multiple_of_512(monkeypatch):
    from lowbit_jax import _compat

    monkeypatch.setattr(_compat, "has_wgmma_kernels", lambda: True)
    q = quant.quantize_4bit(jnp.ones((kern.WGMMA_MIN_N, 768), jnp.float32))  # Llama-2-7B's 11008 is not either
    assert not kern.use_wgmma(16, jnp.bfloat16, q)
