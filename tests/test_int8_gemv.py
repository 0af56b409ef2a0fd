"""The one-launch small-M LLM.int8 kernel (pallas_kernels.int8_gemv) in interpret mode against
the XLA path that computes the same integers (int8_gemm.digits_reference), and its routing."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import ops, quant
from pallas_kernels import int8_gemm, int8_gemv

mi = importlib.import_module("lowbit_jax.ops.matmul_int8")

# Both sides compute the same int32 dots and the same fp32 epilogue operations; only FMA
# contraction may differ (1 fp32 ulp), which can flip one rounding of the output dtype.
ULP = {jnp.bfloat16: 2.0**-7, jnp.float16: 2.0**-10, jnp.float32: 2.0**-22}


def _inputs(rng, m, k, n, n_outliers=5):
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    cols = rng.choice(k, size=n_outliers, replace=False)
    x[:, cols] *= 12.0
    x[0, cols] = rng.uniform(6.5, 40.0, n_outliers) * rng.choice([-1.0, 1.0], n_outliers)  # outliers in any M
    return x, w8


@pytest.mark.parametrize("m,k,n", [(1, 64, 72), (5, 200, 130), (16, 4160, 96), (16, 512, 64)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("with_digit,with_bias", [(True, True), (True, False), (False, True)])
def test_kernel_matches_xla_reference(rng, m, k, n, dtype, with_digit, with_bias):
    xf, w8 = _inputs(rng, m, k, n)
    x = jnp.asarray(xf, dtype)
    codes, sx, mask = quant.int8_vectorwise_quant(x, threshold=6.0 if with_digit else 0.0)
    digit = None
    if with_digit:
        assert int(mask.sum()) >= 5
        codes, sx, digit = int8_gemm.fold_one_digit(x, mask, codes, sx)
    bias = jnp.asarray(rng.standard_normal(n), dtype) if with_bias else None
    got = int8_gemv.matmul(codes, sx, w8.codes, w8.row_absmax, digit, bias, out_dtype=dtype, block_n=32,
                           block_k=128, interpret=True)
    if digit is None:
        ref = int8_gemm.reference(codes, w8.codes, sx, w8.row_absmax, bias=bias, out_dtype=dtype)
    else:
        ref = int8_gemm.digits_reference(codes, sx, w8.codes, w8.row_absmax, digit, bias, dtype)
    assert got.shape == (m, n) and got.dtype == jnp.dtype(dtype)
    g, r = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(g)) and np.abs(r).max() > 0
    np.testing.assert_allclose(g, r, rtol=0, atol=ULP[dtype] * np.abs(r).max())


def test_ops_routes_small_m_to_the_kernel(rng, monkeypatch):
    # From GEMV_MIN_M rows the GPU path is this kernel; interpret mode runs the same code on the
    # CPU. Leading batch dims [2, 7] = 14 rows; the XLA path computes the same one-digit fold.
    monkeypatch.setattr(mi, "SMALL_ENGINE", "gemv")
    k, n = 300, 80
    xf, w8 = _inputs(rng, 14, k, n)
    x = jnp.asarray(xf.reshape(2, 7, k), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    calls = []
    real = int8_gemv.matmul
    monkeypatch.setattr(int8_gemv, "matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for thr in (6.0, 0.0):
        got = jax.jit(lambda x, thr=thr: ops.matmul_int8(x, w8, thr, b, impl="pallas_interpret"))(x)
        ref = jax.jit(lambda x, thr=thr: ops.matmul_int8(x, w8, thr, b, impl="xla"))(x)
        assert got.shape == (2, 7, n)
        g, r = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        np.testing.assert_allclose(g, r, rtol=0, atol=ULP[jnp.bfloat16] * np.abs(r).max())
    assert len(calls) == 2
    # fewer rows than GEMV_MIN_M: not this kernel
    jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, b, impl="pallas_interpret"))(x[0, :3])
    assert len(calls) == 2


def test_bad_inputs_name_the_argument(rng):
    xf, w8 = _inputs(rng, 4, 64, 32)
    codes, sx, mask = quant.int8_vectorwise_quant(jnp.asarray(xf), threshold=6.0)
    with pytest.raises(ValueError, match="codes_x and codes_w must be int8"):
        int8_gemv.matmul(codes.astype(jnp.int32), sx, w8.codes, w8.row_absmax, interpret=True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        big = jnp.zeros((17, 64), jnp.int8)
        int8_gemv.matmul(big, jnp.ones(17), w8.codes, w8.row_absmax, interpret=True)
    with pytest.raises(ValueError, match=r"codes_w must be \[N, 64\]"):
        int8_gemv.matmul(codes, sx, w8.codes[:, :32], w8.row_absmax, interpret=True)
    with pytest.raises(ValueError, match="digit must be"):
        int8_gemv.matmul(codes, sx, w8.codes, w8.row_absmax, (codes[None], sx), interpret=True)
    with pytest.raises(ValueError, match="bias must be"):
        int8_gemv.matmul(codes, sx, w8.codes, w8.row_absmax, bias=jnp.ones(3), interpret=True)
