"""The Pallas 4-bit kernels (GEMV, GEMM, transposed backward) against the jnp reference.

Run in Pallas' interpreter on the CPU (``impl="pallas_interpret"``), where every output buffer
starts as NaN (``pallas.primitives.uninitialized_value``): a tile the kernel never writes
shows up as a non-finite value, so each test also asserts the result is finite.

Tolerances are relative to max|y| of an fp32/fp64 oracle (exact dequantized weights, float64
matmul): the kernel rounds each decoded weight to x's dtype, as the reference does, then
accumulates in fp32; what remains is the output rounding and summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import formats, quant
from lowbit_jax.ops import _matmul_4bit_kernels as kern
from lowbit_jax.ops import matmul_4bit, matmul_4bit_reference
from pallas_kernels import _4bit_common as c4
from _ptx_emulator import run_warp

# max |kernel - oracle| / max |oracle|, per activation dtype
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}
# the kernel against the jnp reference in the same dtype (same rounding of W, other sum order)
TOL_REF = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1e-2}


def _case(rng, m, k, n, quant_type, dq, dtype, blocksize=64, lead=()):
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    q = quant.quantize_4bit(w, blocksize, quant_type, compress_statistics=dq)
    x = jnp.asarray(rng.standard_normal((*lead, m, k)), dtype)
    return x, q


def _oracle(x, q):
    w = np.asarray(quant.dequantize_4bit(q, jnp.float32), np.float64)
    return np.asarray(x, np.float64) @ w.T


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = [
    # m, k, n, quant_type, double quant, dtype
    (1, 64, 40, "nf4", False, "bfloat16"),     # GEMV, one row (fma mode)
    (3, 4160, 100, "fp4", True, "float32"),    # GEMV fma, ragged K (4160/2 bytes) and ragged N
    (1, 1024, 48, "nf4", True, "float16"),     # GEMV split-K (4 splits)
    (16, 64, 100, "fp4", False, "float16"),    # GEMV through the tensor cores (dot mode)
    (17, 4160, 40, "nf4", True, "bfloat16"),   # GEMM, ragged M and K
    (130, 64, 48, "nf4", False, "float32"),    # GEMM, M over two tiles
    (130, 256, 100, "fp4", True, "bfloat16"),  # GEMM, double quant, ragged N (padded rows)
]


@pytest.mark.parametrize("m,k,n,quant_type,dq,dtype", CASES)
def test_forward_matches_reference(rng, m, k, n, quant_type, dq, dtype):
    x, q = _case(rng, m, k, n, quant_type, dq, dtype)
    y = matmul_4bit(x, q, impl="pallas_interpret")
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert bool(jnp.all(jnp.isfinite(y))), "unwritten (NaN-poisoned) output tile"
    assert _rel(y, _oracle(x, q)) < TOL[dtype]
    assert _rel(y, matmul_4bit_reference(x, q)) < TOL_REF[dtype]


@pytest.mark.parametrize("m,k,n,quant_type,dq,dtype", [
    (1, 64, 40, "nf4", True, "bfloat16"),
    (3, 4160, 100, "fp4", False, "float32"),
    (17, 128, 48, "nf4", True, "float16"),
    (130, 64, 100, "nf4", False, "bfloat16"),
])
def test_grad_x_matches_reference(rng, m, k, n, quant_type, dq, dtype):
    x, q = _case(rng, m, k, n, quant_type, dq, dtype)
    bias = jnp.asarray(rng.standard_normal((n,)), dtype)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(impl):
        return lambda x, b: jnp.sum(matmul_4bit(x, q, b, impl=impl).astype(jnp.float32) * ct)

    gx, gb = jax.grad(loss("pallas_interpret"), argnums=(0, 1))(x, bias)
    rx, rb = jax.grad(loss("reference"), argnums=(0, 1))(x, bias)
    assert gx.dtype == x.dtype and bool(jnp.all(jnp.isfinite(gx)))
    assert _rel(gx, rx) < TOL_REF[dtype]
    assert _rel(gb, rb) < TOL_REF[dtype]
    # and against the fp64 oracle dx = ct @ W
    w = np.asarray(quant.dequantize_4bit(q, jnp.float32), np.float64)
    assert _rel(gx, np.asarray(ct, np.float64) @ w) < TOL[dtype]


def test_bias_and_batch_dims(rng):
    x, q = _case(rng, 5, 128, 48, "nf4", True, "bfloat16", lead=(2,))
    bias = jnp.asarray(rng.standard_normal((48,)), jnp.bfloat16)
    y = jax.jit(lambda x, q, b: matmul_4bit(x, q, b, impl="pallas_interpret"))(x, q, bias)
    ref = _oracle(x, q) + np.asarray(bias, np.float64)
    assert y.shape == (2, 5, 48)
    assert _rel(y, ref) < TOL["bfloat16"]


def test_k4096_gemv_split_k(rng):
    x, q = _case(rng, 1, 4096, 32, "nf4", True, "bfloat16")
    y = matmul_4bit(x, q, impl="pallas_interpret")
    assert _rel(y, _oracle(x, q)) < TOL["bfloat16"]


@pytest.mark.parametrize("section", ["gemv_fma", "gemm", "bwd"])
def test_gather_decode_and_blocksize_128(rng, monkeypatch, section):
    cfg = {key: dict(val) for key, val in kern.GPU_CONFIG.items()}
    cfg[section]["decode"] = "gather"
    monkeypatch.setattr(kern, "GPU_CONFIG", cfg)
    m = 2 if section == "gemv_fma" else 24
    x, q = _case(rng, m, 512, 48, "fp4", True, "float32", blocksize=128)
    if section == "bwd":
        ct = jnp.asarray(rng.standard_normal((m, 48)), jnp.float32)
        g = jax.grad(lambda x: jnp.sum(matmul_4bit(x, q, impl="pallas_interpret") * ct))(x)
        w = np.asarray(quant.dequantize_4bit(q, jnp.float32), np.float64)
        assert _rel(g, np.asarray(ct, np.float64) @ w) < TOL["float32"]
    else:
        y = matmul_4bit(x, q, impl="pallas_interpret")
        assert _rel(y, _oracle(x, q)) < TOL["float32"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gemm_weight_left_orientation(rng, monkeypatch, dtype):
    # orient "wx": W tile as the dot's left operand, transposed result; same numbers
    cfg = {key: dict(val) for key, val in kern.GPU_CONFIG.items()}
    cfg["gemm"]["orient"] = "wx"
    monkeypatch.setattr(kern, "GPU_CONFIG", cfg)
    x, q = _case(rng, 40, 512, 80, "nf4", True, dtype)
    y = matmul_4bit(x, q, impl="pallas_interpret")
    assert y.shape == (40, 80)
    assert _rel(y, _oracle(x, q)) < TOL[dtype]
    assert _rel(y, matmul_4bit_reference(x, q)) < TOL_REF[dtype]


def test_band_crossover():
    # from TILED_MIN_M rows (128, measured) the band path; from BAND_MIN_M (64) for narrow
    # layers whose GEMM grid would leave SMs idle (N=4096: 32 tiles at M=64); else the GEMM / GEMVs
    assert kern.use_bands(kern.TILED_MIN_M, 14336) and kern.use_bands(4096, 64)
    assert kern.use_bands(128, 4096) and kern.use_bands(128, 14336)
    assert kern.use_bands(64, 4096) and not kern.use_bands(64, 14336)
    assert not kern.use_bands(16, 4096) and not kern.use_bands(63, 1024)


def test_tiled_large_m_path(rng, monkeypatch):
    monkeypatch.setattr(kern, "TILED_MIN_M", 32)
    monkeypatch.setattr(kern, "TILE_ROWS", 32)
    x, q = _case(rng, 40, 128, 100, "nf4", True, "bfloat16")
    y = matmul_4bit(x, q, impl="pallas_interpret")
    assert _rel(y, _oracle(x, q)) < TOL["bfloat16"]
    ct = jnp.asarray(rng.standard_normal((40, 100)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(matmul_4bit(x, q, impl="pallas_interpret").astype(jnp.float32) * ct))(x)
    w = np.asarray(quant.dequantize_4bit(q, jnp.float32), np.float64)
    assert _rel(g, np.asarray(ct, np.float64) @ w) < TOL["bfloat16"]


def test_code_tables_match_formats():
    for qt in ("nf4", "fp4"):
        np.testing.assert_array_equal(np.asarray(c4.table(qt), np.float32),
                                      np.asarray(formats.get_4bit_code(qt), np.float32))


def test_weight_gets_no_gradient(rng):
    x, q = _case(rng, 3, 64, 40, "nf4", False, "float32")
    gq = jax.grad(lambda q: jnp.sum(matmul_4bit(x, q, impl="pallas_interpret")), allow_int=True)(q)
    assert float(jnp.max(jnp.abs(gq.absmax))) == 0.0


def test_bad_input_errors(rng):
    x, q = _case(rng, 2, 96, 40, "nf4", False, "float32")  # 96 is not a multiple of 64
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        matmul_4bit(x, q, impl="pallas_interpret")
    with pytest.raises(ValueError, match="impl"):
        matmul_4bit(x, q, impl="cuda")
    # auto falls back to the reference for such a weight
    assert _rel(matmul_4bit(x, q), _oracle(x, q)) < TOL["float32"]
    with pytest.raises(ValueError, match="quant_type"):
        c4.table("int4")


@pytest.mark.parametrize("m", [2, 16, 24])
def test_prmt_decode_numerics_bf16(rng, monkeypatch, m):
    """The prmt decode goes through fp16 code values; in the interpreter it is emulated."""
    cfg = {key: dict(val, decode="prmt") if "decode" in val else dict(val) for key, val in kern.GPU_CONFIG.items()}
    monkeypatch.setattr(kern, "GPU_CONFIG", cfg)
    x, q = _case(rng, m, 256, 48, "nf4", True, "bfloat16")
    y = matmul_4bit(x, q, impl="pallas_interpret")
    assert _rel(y, _oracle(x, q)) < TOL["bfloat16"]


@pytest.mark.parametrize("m,dtype", [(2, "bfloat16"), (16, "float16"), (24, "bfloat16"), (3, "float32")])
def test_lut_decode_dot_kernels_interpreted(rng, monkeypatch, m, dtype):
    """The byte-table decode in the dot kernels (split-K GEMV for m <= 16, the GEMM above):
    code and product rounded to x's dtype (emulated in the interpreter; the PTX is checked on
    the warp emulator in test_gemv_mma.py); fp32 x falls back to the exact select decode."""
    cfg = {key: dict(val) for key, val in kern.GPU_CONFIG.items()}
    for section in ("gemv_dot", "gemm"):
        cfg[section]["decode"] = "lut"
    monkeypatch.setattr(kern, "GPU_CONFIG", cfg)
    x, q = _case(rng, m, 512, 48, "nf4", True, dtype)
    y = matmul_4bit(x, q, impl="pallas_interpret")
    assert _rel(y, _oracle(x, q)) < TOL[dtype]


def _run_ptx(asm: str, r: int) -> list[int]:
    (regs,) = run_warp(asm, [{"$2": r}])
    return [regs["$0"], regs["$1"]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_prmt_asm_decodes_every_byte(quant_type, dtype):
    """The inline PTX, run by an interpreter of its instructions, gives the 16-bit code values."""
    table16 = np.asarray(np.asarray(c4.table(quant_type), np.float32).astype(jnp.dtype(dtype))).view(np.uint16)
    for start in range(0, 256, 4):
        byts = np.arange(start, start + 4) ^ 0xA5  # every byte value once, shuffled in the word
        word = int(sum(int(b) << (8 * i) for i, b in enumerate(byts)))
        halves = lambda w: [w & 0xFFFF, w >> 16]
        o = _run_ptx(c4._prmt_asm(c4.table(quant_type), "hi", dtype), word)
        hi = np.array(halves(o[0]) + halves(o[1]), np.uint16)
        o = _run_ptx(c4._prmt_asm(c4.table(quant_type), "lo", dtype), word)
        lo = np.array(halves(o[0]) + halves(o[1]), np.uint16)
        np.testing.assert_array_equal(hi, table16[byts >> 4])
        np.testing.assert_array_equal(lo, table16[byts & 15])


# --- the one-row GEMV (row sums) and the band decode of the large-M path, launch variants ---
from pallas_kernels import dequant_4bit, gemv_4bit  # noqa: E402


def _operands(q):
    ops = kern.operands(q)
    return ops["packed"], ops["absmax"], {k: v for k, v in ops.items() if k not in ("packed", "absmax")}


@pytest.mark.parametrize("k,n,quant_type,dq,dtype,blocksize,cfg", [
    (512, 32, "nf4", True, "bfloat16", 64, dict(block_n=8, blocks_per_iter=4)),
    (512, 32, "fp4", False, "float16", 64, dict(block_n=4, blocks_per_iter=2, prefetch=True)),
    (512, 32, "nf4", True, "bfloat16", 64, dict(block_n=8, blocks_per_iter=2, splits=2)),
    (1024, 16, "nf4", True, "float16", 128, dict(block_n=16, blocks_per_iter=8)),
    (1024, 16, "fp4", True, "bfloat16", 256, dict(block_n=2, blocks_per_iter=1, prefetch=True, splits=2)),
])
def test_gemv_rows_kernel_variants(rng, k, n, quant_type, dq, dtype, blocksize, cfg):
    x, q = _case(rng, 1, k, n, quant_type, dq, dtype, blocksize=blocksize)
    bias = jnp.asarray(rng.standard_normal((n,)), dtype)
    packed, absmax, rest = _operands(q)
    y = gemv_4bit.gemv_4bit(x, packed, absmax, bias=bias, interpret=True, **rest, **cfg)
    assert y.shape == (1, n) and y.dtype == x.dtype and bool(jnp.all(jnp.isfinite(y)))
    ref = _oracle(x, q) + np.asarray(bias, np.float64)
    assert _rel(y, ref) < TOL[dtype]
    assert _rel(y, matmul_4bit_reference(x, q, bias)) < TOL_REF[dtype]


def test_gemv_rows_ragged_n_and_large_blocksize(rng):
    # N=100 pads the weight rows to the row tile; blocksize 512 is past the row-sum kernel's
    # range and takes the split-K GEMV instead
    for blocksize, n in ((64, 100), (512, 40)):
        x, q = _case(rng, 1, 1024, n, "nf4", True, "bfloat16", blocksize=blocksize)
        y = matmul_4bit(x, q, impl="pallas_interpret")
        assert y.shape == (1, n) and bool(jnp.all(jnp.isfinite(y)))
        assert _rel(y, _oracle(x, q)) < TOL["bfloat16"]


@pytest.mark.parametrize("dq,dtype,quant_type", [(True, "bfloat16", "nf4"), (False, "float16", "fp4")])
def test_dequant_band_matches_reference(rng, dq, dtype, quant_type):
    n, k = 96, 512
    _, q = _case(rng, 1, k, n, quant_type, dq, dtype)
    packed, absmax, rest = _operands(q)
    band = dequant_4bit.dequantize_rows(packed, absmax, jnp.int32(32), rows=64, dtype=jnp.dtype(dtype),
                                        block_rows=16, blocks=4, interpret=True, **rest)
    assert band.shape == (64, k) and band.dtype == jnp.dtype(dtype)
    ref = np.asarray(quant.dequantize_4bit(q, jnp.float32), np.float64)[32:96]
    # the prmt decode rounds the code value to fp16 before the fp32 scale: within 1 ulp of dtype
    np.testing.assert_allclose(np.asarray(band, np.float64), ref, rtol=2 ** -7, atol=1e-6)


def test_bands_cover_the_weight(monkeypatch):
    w = quant.quantize_4bit(jnp.ones((14336, 4096), jnp.float32), 64, "nf4")
    assert kern._bands(w, 32) == (7168, 2)  # the default: two halves at N=14336
    monkeypatch.setattr(kern, "TILE_ROWS", 4096)
    assert kern._bands(w, 32) == (3584, 4)  # no padding at N=14336
    w = quant.quantize_4bit(jnp.ones((4096, 4096), jnp.float32), 64, "nf4")
    assert kern._bands(w, 32) == (2048, 2)  # never one band holding the whole weight


@pytest.mark.parametrize("quant_type,dq,dtype,blocksize", [
    ("nf4", True, "bfloat16", 64), ("fp4", False, "float16", 128), ("nf4", False, "bfloat16", 64)])
def test_stacked_layer_is_read_in_place(rng, quant_type, dq, dtype, blocksize):
    # matmul_4bit(layer=i) on a weight stacked over layers equals the product with layer i:
    # one row of x through the GEMV that indexes the stack in-kernel, more rows by slicing
    n_layers, k, n = 3, 512, 40
    qs = [_case(rng, 1, k, n, quant_type, dq, dtype, blocksize)[1] for _ in range(n_layers)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    f = jax.jit(lambda x, i: matmul_4bit(x, stacked, impl="pallas_interpret", layer=i))
    for m in (1, 3):
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        for i in range(n_layers):  # the layer is traced: one compile serves them all
            y = np.asarray(f(x, jnp.int32(i)), np.float32)
            y_one = np.asarray(matmul_4bit(x, qs[i], impl="pallas_interpret"), np.float32)
            np.testing.assert_array_equal(y, y_one)
            assert _rel(y, _oracle(x, qs[i])) < TOL[dtype]
    # per-layer codes stored 2-D ([out, in/2], as the sharded loader does): the same product
    stacked_2d = stacked.replace(packed=stacked.packed.reshape(n_layers, n, k // 2))
    x = jnp.asarray(rng.standard_normal((1, k)), dtype)
    np.testing.assert_array_equal(np.asarray(matmul_4bit(x, stacked_2d, impl="pallas_interpret", layer=2), np.float32),
                                  np.asarray(matmul_4bit(x, qs[2], impl="pallas_interpret"), np.float32))
    assert kern.reads_stacked(jnp.zeros((1, k), dtype), stacked)
    assert not kern.reads_stacked(jnp.zeros((3, k), dtype), stacked)
    # the gradient still reaches x (the layer is sliced for the backward)
    x = jnp.asarray(rng.standard_normal((1, k)), dtype)
    g = jax.grad(lambda x: jnp.sum(matmul_4bit(x, stacked, impl="pallas_interpret", layer=1).astype(jnp.float32)))(x)
    g_one = jax.grad(lambda x: jnp.sum(matmul_4bit(x, qs[1], impl="pallas_interpret").astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_one, np.float32))
    with pytest.raises(ValueError, match="stacked"):
        matmul_4bit(x, qs[0], layer=0)
    # a stack of one layer (a one-layer model) is a stack too
    one = jax.tree.map(lambda a: a[None], qs[0])
    np.testing.assert_array_equal(np.asarray(matmul_4bit(x, one, impl="pallas_interpret", layer=0), np.float32),
                                  np.asarray(matmul_4bit(x, qs[0], impl="pallas_interpret"), np.float32))
