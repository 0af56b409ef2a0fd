"""quant.py against the real bitsandbytes 0.50.2 on the CPU: codes and scales bit-identical.

Inputs are fresh N(0, s^2) tensors with a random scale s per case (never zeros); ragged shapes
exercise the partial last block and odd element counts.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from lowbit_jax import quant
from conftest import TORCH_DTYPES, from_torch, to_torch

SHAPES = [(64, 64), (33, 17), (7,), (3, 5, 70), (128, 300)]


def _rand(rng, shape):
    return (rng.standard_normal(shape) * rng.uniform(0.01, 10.0)).astype(np.float32)


def _bnb_4bit(bnbF, torch, x, dtype, **kw):
    return bnbF.quantize_4bit(to_torch(torch, x, dtype), **kw)


def _ours_4bit(torch, x, dtype, **kw):
    # Round-trip through torch's dtype so both libraries see the very same 16-bit values.
    xt = from_torch(to_torch(torch, x, dtype))
    return quant.quantize_4bit(jnp.asarray(xt).astype(dtype), **kw)


def _check_4bit(bnbF, torch, x, dtype, blocksize, quant_type, dq):
    packed, state = _bnb_4bit(bnbF, torch, x, dtype, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    q = _ours_4bit(torch, x, dtype, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    if dq:
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
        assert np.float32(q.offset).view(np.uint32) == np.float32(state.offset.item()).view(np.uint32)
    else:
        assert q.nested_absmax is None and q.offset is None
    # Dequantized values: bnb's default (torch) implementation is the reference. Its CPU C
    # kernel is wrong when a block spans several rows of the last dim (blocksize > shape[-1]),
    # see test_bnb_cpu_dequant_bug_is_theirs.
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if dq:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    ref = fn(packed.reshape(-1), absmax.float(), _get_4bit_code(quant_type, packed.device), blocksize,
             state.shape, getattr(torch, dtype))
    np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(q).astype(jnp.float32)), from_torch(ref))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_4bit_parity(bnbF, torch, rng, shape, dtype, quant_type, dq):
    for blocksize in (64, 256):
        _check_4bit(bnbF, torch, _rand(rng, shape), dtype, blocksize, quant_type, dq)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_parity_all_blocksizes(bnbF, torch, rng, blocksize, quant_type):
    _check_4bit(bnbF, torch, _rand(rng, (37, 129)), "float32", blocksize, quant_type, True)
    _check_4bit(bnbF, torch, _rand(rng, (8, 1024)), "bfloat16", blocksize, quant_type, False)


def test_4bit_parity_large_double_quant(bnbF, torch, rng):
    # 20480 blocks: exercises the multi-level cascade of the offset's float32 sum.
    _check_4bit(bnbF, torch, _rand(rng, (1024, 1280)), "float32", 64, "nf4", True)


def test_4bit_boundary_values(bnbF, torch):
    # Values landing exactly on code midpoints after scaling (ties) and on +-absmax.
    for quant_type in ("nf4", "fp4"):
        code = bnbF.get_4bit_type(quant_type, device="cpu").numpy()
        s = np.sort(code)
        mids = (s[:-1] + s[1:]) / 2
        x = np.concatenate([mids, -mids, [1.0, -1.0, 0.0, 1e-30]]).astype(np.float32)
        x = np.resize(x, 200) * np.float32(3.0)
        for dtype in TORCH_DTYPES:
            _check_4bit(bnbF, torch, x, dtype, 64, quant_type, False)


def test_4bit_quant_storage(bnbF, torch, rng):
    x = _rand(rng, (16, 64))
    packed, _ = bnbF.quantize_4bit(to_torch(torch, x, "float32"), quant_type="nf4", quant_storage=torch.bfloat16)
    q = quant.quantize_4bit(jnp.asarray(x), quant_storage=jnp.bfloat16)
    # codes stay bytes in memory; the export writes them as bitsandbytes' bf16 view, bit for bit
    assert q.packed.dtype == jnp.uint8 and q.quant_storage == "bfloat16"
    theirs = packed.view(torch.int16).numpy().reshape(-1).view(np.uint16)
    np.testing.assert_array_equal(np.asarray(q.packed).view(np.uint16), theirs)
    from lowbit_jax.convert.bnb_format import packed4bit_to_bnb

    exported = packed4bit_to_bnb(q)["weight"]
    assert str(exported.dtype) == "bfloat16" and exported.shape == (x.size // 4, 1)
    np.testing.assert_array_equal(exported.view(np.uint16).reshape(-1), theirs)
    # stacking (as models stack layers) must not touch a code: float views of code bytes are
    # NaN patterns that XLA may canonicalise
    stacked = jax.tree.map(lambda *a: jnp.stack(a), q, q)
    np.testing.assert_array_equal(np.asarray(stacked.packed[1]), np.asarray(q.packed))
    ref = quant.dequantize_4bit(quant.quantize_4bit(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(q)), np.asarray(ref))


def test_roundtrip_error_matches_bnb(bnbF, torch, rng):
    x = rng.standard_normal((1024, 1024)).astype(np.float32)
    for quant_type, expected in (("nf4", 0.092), ("fp4", 0.122)):
        packed, state = bnbF.quantize_4bit(to_torch(torch, x, "float32"), quant_type=quant_type, blocksize=64)
        err_bnb = np.linalg.norm(bnbF.dequantize_4bit(packed, state).numpy() - x) / np.linalg.norm(x)
        q = quant.quantize_4bit(jnp.asarray(x), quant_type=quant_type)
        err = float(np.linalg.norm(np.asarray(quant.dequantize_4bit(q)) - x) / np.linalg.norm(x))
        assert err == pytest.approx(err_bnb, rel=1e-6)
        assert err == pytest.approx(expected, abs=0.004)


def test_bnb_cpu_dequant_bug_is_theirs(bnbF, torch, rng):
    """bitsandbytes 0.50.2's CPU C dequantize uses the wrong absmax when blocks span rows.

    Our result equals its own torch reference and has the lower error; this documents why the
    parity tests compare against the reference implementation.
    """
    x = rng.standard_normal((64, 64)).astype(np.float32)
    packed, state = bnbF.quantize_4bit(to_torch(torch, x, "float32"), quant_type="nf4", blocksize=256)
    theirs = bnbF.dequantize_4bit(packed, state).numpy()
    ours = np.asarray(quant.dequantize_4bit(quant.quantize_4bit(jnp.asarray(x), blocksize=256)))
    assert np.abs(ours - x).mean() < np.abs(theirs - x).mean()


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_parity(bnbF, torch, rng, blocksize, dtype, signed):
    for shape in [(1000,), (4096,), (3, 77, 50)]:
        x = _rand(rng, shape)
        if not signed:
            x = np.abs(x)
        code_t = bnbF.create_dynamic_map(signed=signed)
        codes, state = bnbF.quantize_blockwise(to_torch(torch, x, dtype), code=code_t, blocksize=blocksize)
        xt = from_torch(to_torch(torch, x, dtype))
        q = quant.quantize_blockwise(jnp.asarray(xt).astype(dtype), code=code_t.numpy(), blocksize=blocksize)
        np.testing.assert_array_equal(np.asarray(q.codes), codes.numpy())
        np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
        back = bnbF.dequantize_blockwise(codes, state)
        np.testing.assert_array_equal(np.asarray(quant.dequantize_blockwise(q).astype(jnp.float32)), from_torch(back))


def test_blockwise_nested_parity(bnbF, torch, rng):
    x = _rand(rng, (300, 257))
    codes, state = bnbF.quantize_blockwise(to_torch(torch, x, "float32"), blocksize=256, nested=True)
    q = quant.quantize_blockwise(jnp.asarray(x), blocksize=256, nested=True)
    np.testing.assert_array_equal(np.asarray(q.codes), codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize_blockwise(q)), bnbF.dequantize_blockwise(codes, state).numpy())


def test_blockwise_zero_block(bnbF, torch, rng):
    x = _rand(rng, (1024,))
    x[256:512] = 0.0
    codes, state = bnbF.quantize_blockwise(to_torch(torch, x, "float32"), blocksize=256)
    q = quant.quantize_blockwise(jnp.asarray(x), blocksize=256)
    np.testing.assert_array_equal(np.asarray(q.codes), codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_vectorwise_parity(bnbF, torch, rng, dtype, threshold):
    for shape in [(17, 64), (1, 300), (130, 96)]:
        x = (rng.standard_normal(shape) * 1.5).astype(np.float32)
        # Plant outlier columns.
        cols = rng.choice(shape[1], size=3, replace=False)
        x[rng.integers(0, shape[0], size=3), cols] = rng.uniform(6.5, 20.0, size=3) * rng.choice([-1, 1], size=3)
        xt = to_torch(torch, x, dtype)
        codes_ref, stats_ref, outliers_ref = bnbF.int8_vectorwise_quant(xt.clone(), threshold=threshold)
        codes, row_absmax, outlier_cols = quant.int8_vectorwise_quant(jnp.asarray(from_torch(xt)).astype(dtype), threshold=threshold)
        np.testing.assert_array_equal(np.asarray(codes), codes_ref.numpy())
        np.testing.assert_array_equal(np.asarray(row_absmax), stats_ref.numpy())
        if threshold > 0:
            np.testing.assert_array_equal(np.flatnonzero(np.asarray(outlier_cols)), np.sort(outliers_ref.numpy()))
            assert set(cols.tolist()) <= set(np.flatnonzero(np.asarray(outlier_cols)).tolist())
        else:
            assert not np.asarray(outlier_cols).any()
        back_ref = bnbF.int8_vectorwise_dequant(codes_ref, stats_ref).numpy()
        np.testing.assert_array_equal(np.asarray(quant.int8_vectorwise_dequant(codes, row_absmax)), back_ref)
