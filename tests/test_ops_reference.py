"""The reference quantized matmuls: values, shapes, and a backward that reaches x only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import ops, quant

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matmul_4bit_equals_dense_on_dequantized(rng, dtype, quant_type):
    w = jnp.asarray(rng.standard_normal((48, 80)) * 0.1, jnp.float32)
    q = quant.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    x = jnp.asarray(rng.standard_normal((2, 3, 80)), dtype)
    b = jnp.asarray(rng.standard_normal((48,)), jnp.float32)
    y = ops.matmul_4bit(x, q, b)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    ref = np.asarray(x, np.float32) @ np.asarray(quant.dequantize_4bit(q, dtype), np.float32).T + np.asarray(b)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=TOL[dtype], atol=TOL[dtype] * np.abs(ref).max())


def test_matmul_4bit_grad_reaches_x_and_bias_only(rng):
    w = jnp.asarray(rng.standard_normal((32, 64)) * 0.1, jnp.float32)
    q = quant.quantize_4bit(w)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((32,)), jnp.float32)
    wd = quant.dequantize_4bit(q)

    def loss(x, b, q):
        return jnp.sum(jnp.sin(ops.matmul_4bit(x, q, b)))

    gx, gb, gq = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)(x, b, q)
    rx, rb = jax.grad(lambda x, b: jnp.sum(jnp.sin(x @ wd.T + b)), argnums=(0, 1))(x, b)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(rb), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(gq.absmax).max()) == 0.0


def test_matmul_int8_plain_and_outliers(rng):
    w = jnp.asarray(rng.standard_normal((40, 64)) * 0.1, jnp.float32)
    w8 = quant.quantize_int8(w)
    x = np.asarray(rng.standard_normal((6, 64)), np.float32)
    x[2, 5] = 9.0  # an outlier column
    x = jnp.asarray(x)
    exact = np.asarray(x) @ np.asarray(w).T
    err0 = np.abs(np.asarray(ops.matmul_int8(x, w8, threshold=0.0)) - exact).max()
    err6 = np.abs(np.asarray(ops.matmul_int8(x, w8, threshold=6.0)) - exact).max()
    assert err6 < err0  # the outlier column is no longer crushed by int8 rounding
    assert err6 < 0.02 * np.abs(exact).max()
    g = jax.grad(lambda x: jnp.sum(ops.matmul_int8(x, w8) ** 2))(x)
    assert g.shape == x.shape and float(jnp.abs(g).max()) > 0


def test_quantized_linear_dispatch(rng):
    w = jnp.asarray(rng.standard_normal((16, 32)) * 0.1, jnp.float32)  # [in, out] Flax layout
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    dense = ops.quantized_linear(x, w)
    np.testing.assert_allclose(np.asarray(dense), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    q = quant.quantize_4bit(w.T)
    np.testing.assert_allclose(
        np.asarray(ops.quantized_linear(x, q)), np.asarray(x @ quant.dequantize_4bit(q).T), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="last dimension"):
        ops.matmul_4bit(jnp.ones((2, 7)), q)
    with pytest.raises(ValueError, match="q must be a Packed4bit"):
        ops.matmul_4bit(x, w)
