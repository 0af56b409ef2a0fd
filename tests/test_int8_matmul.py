"""LLM.int8 matmul: parity with bitsandbytes' Linear8bitLt, the capped outlier scheme, the Pallas
int8 GEMM in interpret mode, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import ops, quant
from pallas_kernels import int8_gemm

# bitsandbytes casts its int8 result to fp16 before adding the fp16 outlier product; we add in
# fp32 and cast once. The int8 parts are bit-identical, so outputs may differ by at most two
# fp16 roundings of the largest output: 2 ulp = 2**-9 relative to max|y|.
FP16_PARITY_RTOL = 2.0**-9


def _planted(rng, m, k, cols, value=8.0):
    x = rng.standard_normal((m, k)).astype(np.float32)
    for c in cols:
        x[rng.integers(0, m), c] = value * np.sign(rng.standard_normal() or 1.0)
    return x


def _bnb_linear(torch, w, b, threshold):
    import bitsandbytes as bnb

    n, k = w.shape
    lin = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=threshold)
    lin.weight = bnb.nn.Int8Params(torch.from_numpy(w).half(), requires_grad=False, has_fp16_weights=False)
    lin.bias = torch.nn.Parameter(torch.from_numpy(b).half())
    # eval(): in training mode bitsandbytes' CPU path dequantizes W and skips LLM.int8 entirely.
    return lin.to("cpu").eval()


@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("impl,m", [("xla", 24), ("pallas_interpret", 24), ("pallas_interpret", 8), ("xla", 8)])
def test_parity_with_bnb_linear8bitlt(torch, bnbF, rng, threshold, impl, m):
    # m=8 takes the small-M split-K kernel (outliers as int8 digits), m=24 the capped gather
    k, n = 160, 96
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    cols = sorted(rng.choice(k, size=5, replace=False).tolist())
    x = _planted(rng, m, k, cols)
    lin = _bnb_linear(torch, w, b, threshold)
    with torch.no_grad():
        y_bnb = lin(torch.from_numpy(x).half()).float().numpy()

    w8 = quant.quantize_int8(jnp.asarray(w, jnp.float16))
    np.testing.assert_array_equal(np.asarray(w8.codes), lin.state.CB.numpy())
    np.testing.assert_array_equal(np.asarray(w8.row_absmax), lin.state.SCB.numpy())
    xj = jnp.asarray(x, jnp.float16)
    y = np.asarray(ops.matmul_int8(xj, w8, threshold, jnp.asarray(b, jnp.float16), impl=impl), np.float32)

    if threshold > 0:
        _, _, mask = quant.int8_vectorwise_quant(xj, threshold=threshold)
        ours = np.flatnonzero(np.asarray(mask)).tolist()
        assert ours == cols == lin.state.idx.tolist()
        np.testing.assert_allclose(y, y_bnb, rtol=0, atol=FP16_PARITY_RTOL * np.abs(y_bnb).max())
    else:
        np.testing.assert_array_equal(y, y_bnb)  # no outlier part: one identical rounding
    # LLM.int8 keeps outlier columns precise; plain int8 crushes them.
    exact = x @ w.T + b
    err = np.abs(y - exact).max() / np.abs(exact).max()
    assert err < (0.02 if threshold > 0 else 0.1)


def test_cap_exceeded_is_exact_just_chunked(rng):
    k, n, m = 96, 40, 7
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    cols = rng.choice(k, size=11, replace=False)
    x = jnp.asarray(_planted(rng, m, k, cols), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    full = ops.matmul_int8(x, w8, 6.0, b, max_outliers=64, impl="xla")
    for cap in (1, 4, 11):  # 11 chunks, 3 chunks (ragged), exactly one
        capped = jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, b, max_outliers=cap, impl="xla"))(x)
        np.testing.assert_allclose(np.asarray(capped), np.asarray(full), rtol=1e-6, atol=1e-5)
    ref = ops.matmul_int8(x, w8, 6.0, b, impl="reference")  # dense-mask oracle
    # M <= 16 represents x's outlier columns as one int8 digit plus a code at the row's int8
    # step t (SMALL_DIGITS=1): at most t / 2 an element, so at most sum |W| t / 2 a output
    _, sx, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
    wd = np.asarray(quant.dequantize_int8(w8))
    bound = (np.asarray(sx)[:, None] / 254) * np.abs(wd[:, np.asarray(mask)]).sum(axis=1)[None, :]
    assert np.all(np.abs(np.asarray(full) - np.asarray(ref)) <= bound + 1e-5)
    # The outlier part alone, against a dense product over the masked columns.
    part = ops.matmul_int8.__globals__["outlier_part"](x, w8, mask, 4)
    dense = (np.asarray(x) * np.asarray(mask)[None, :]) @ wd.T
    np.testing.assert_allclose(np.asarray(part), dense, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cap_exceeded_in_kernel_branch(rng, dtype):
    # M > 16: the Pallas kernel adds the columns past the cap itself (in-kernel branch on the
    # count, no XLA lax.cond); 150 outlier columns over cap 4 = 3 in-kernel chunks of 64 (ragged)
    k, n, m = 400, 48, 20
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    x = jnp.asarray(_planted(rng, m, k, rng.choice(k, size=150, replace=False)), dtype)
    b = jnp.asarray(rng.standard_normal(n), dtype)
    ref = np.asarray(ops.matmul_int8(x, w8, 6.0, b, max_outliers=64, impl="xla"), np.float32)
    scale = np.abs(ref).max()
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10
    for cap in (4, 64, 160):  # over the cap (chunks in-kernel), over it, under it
        y = jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, b, max_outliers=cap, impl="pallas_interpret"))(x)
        y = np.asarray(y, np.float32)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, ref, rtol=0, atol=2 * ulp * scale)


@pytest.mark.parametrize(
    "m,k,n,cfg",
    [
        (1, 96, 40, dict(block_m=16, block_n=32, block_k=32, splits=1)),
        (3, 200, 72, dict(block_m=16, block_n=32, block_k=32, splits=2)),  # K and N ragged
        (17, 128, 48, dict(block_m=16, block_n=16, block_k=64, splits=1)),  # M ragged
        (40, 256, 64, dict(block_m=32, block_n=64, block_k=64, splits=4)),
    ],
)
def test_int8_gemm_interpret_matches_reference(rng, m, k, n, cfg):
    cx = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    cw = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    sx = jnp.asarray(rng.uniform(0.1, 4.0, m), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.1, 4.0, n), jnp.float32)
    c = 5  # outlier columns: padded to 16 for the tensor-core dot
    sub_x = jnp.asarray(rng.standard_normal((m, c)) * 8, jnp.bfloat16)
    sub_w = jnp.asarray(rng.standard_normal((n, c)) * 0.1, jnp.bfloat16)
    extra = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    for out_dtype in (jnp.float32, jnp.bfloat16):
        kw = dict(sub_x=sub_x, sub_w=sub_w, extra=extra, bias=bias, out_dtype=out_dtype)
        y = int8_gemm.fused_matmul(cx, sx, cw, sw, interpret=True, **kw, **cfg)
        ref = int8_gemm.reference(cx, cw, sx, sw, **kw)
        assert y.shape == (m, n) and y.dtype == out_dtype
        # int32 accumulation is exact and the epilogue is the same op order: equal up to fp32 ulps.
        tol = 1e-5 if out_dtype == jnp.float32 else 2.0**-8  # fp32 sums may reassociate
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    # int32 partials of the split-K path are the exact integer product.
    if cfg["splits"] > 1:
        y = int8_gemm.fused_matmul(cx, jnp.full((m,), 127.0), cw, jnp.full((n,), 127.0),
                                   out_dtype=jnp.float32, interpret=True, **cfg)
        exact = np.asarray(cx, np.int64) @ np.asarray(cw, np.int64).T
        np.testing.assert_allclose(np.asarray(y), exact * (127.0 * 127.0 * 6.200124e-05), rtol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 17])
def test_ops_pallas_interpret_matches_xla(rng, m):
    k, n = 128, 80
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32))
    x = jnp.asarray(_planted(rng, m, k, [7, 100]), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    for thr in (6.0, 0.0):
        a = ops.matmul_int8(x, w8, thr, b, impl="pallas_interpret")
        r = ops.matmul_int8(x, w8, thr, b, impl="xla")
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), rtol=1e-2, atol=1e-2)
        assert float(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)).max()) <= float(
            2.0**-7 * jnp.abs(r.astype(jnp.float32)).max())


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_grad_x_and_bias(rng, impl):
    k, n = 64, 48
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    wd = quant.dequantize_int8(w8)
    x = jnp.asarray(_planted(rng, 2 * 5, k, [9]).reshape(2, 5, k), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, 5, n)), jnp.float32)

    def loss(x, b, w8):
        return jnp.sum(jnp.sin(ops.matmul_int8(x, w8, 6.0, b, impl=impl)) * t)

    gx, gb, gw = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)(x, b, w8)
    # The backward is the straight-through gradient of x @ dequant(W).T at the quantized output.
    y = ops.matmul_int8(x, w8, 6.0, b, impl=impl)
    g = jnp.cos(y) * t
    np.testing.assert_allclose(np.asarray(gx), np.asarray(g @ wd), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(g.sum((0, 1))), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(gw.row_absmax).max()) == 0.0
    assert gx.shape == x.shape and float(jnp.abs(gx).max()) > 0


def test_bad_input_errors(rng):
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((8, 16)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    with pytest.raises(ValueError, match="in-features"):
        ops.matmul_int8(x[:, :8], w8)
    with pytest.raises(ValueError, match="threshold"):
        ops.matmul_int8(x, w8, threshold=-1.0)
    with pytest.raises(ValueError, match="max_outliers"):
        ops.matmul_int8(x, w8, max_outliers=0)
    with pytest.raises(ValueError, match="impl"):
        ops.matmul_int8(x, w8, impl="cuda")
    with pytest.raises(ValueError, match="bias"):
        ops.matmul_int8(x, w8, bias=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="int8"):
        int8_gemm.fused_matmul(x, jnp.ones(2), w8.codes, w8.row_absmax)


def test_outlier_digits_bound(rng):
    # x ~= s1 d1 + s2 d2 on outlier columns, zero elsewhere; error <= s2 / 2 = max / 64516 a row
    x = jnp.asarray(_planted(rng, 5, 300, rng.choice(300, 12, replace=False), value=40.0), jnp.bfloat16)
    _, _, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
    dig, sc = int8_gemm.outlier_digits(x, mask)
    assert dig.dtype == jnp.int8 and dig.shape == (2, 5, 300) and sc.shape == (2, 5)
    rebuilt = np.asarray(sc[0])[:, None] * np.asarray(dig[0], np.float32) + np.asarray(sc[1])[:, None] * np.asarray(dig[1], np.float32)
    xo = np.where(np.asarray(mask)[None, :], np.asarray(x, np.float32), 0.0)
    bound = np.abs(xo).max(axis=1) / 64516 * 1.001
    assert np.all(np.abs(rebuilt - xo) <= bound[:, None])
    assert np.all(rebuilt[:, ~np.asarray(mask)] == 0)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_small_m_dense_outliers_any_count(rng, m, dtype):
    # Small M (the split-K path) computes the outlier product densely in the kernel: no cap.
    # 40 outlier columns, far over max_outliers=4; K ragged. Random data, never zeros.
    k, n = 200, 72
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    cols = rng.choice(k, size=40, replace=False)
    x = jnp.asarray(_planted(rng, m, k, cols), dtype)
    b = jnp.asarray(rng.standard_normal(n), dtype)
    _, _, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
    assert int(mask.sum()) >= 40
    y = jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, b, max_outliers=4, impl="pallas_interpret"))(x)
    y_xla = jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, b, max_outliers=4, impl="xla"))(x)
    # the kernel and the stacked-rows XLA dot compute the same digits: equal up to fp32 sums
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_xla, np.float32), rtol=0,
                               atol=(2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10) * np.abs(np.asarray(y_xla, np.float32)).max())
    ref = ops.matmul_int8(x, w8, 6.0, b, impl="reference")
    y32, r32 = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(y32))
    # Same int8 part; the reference casts the int8 part to the 16-bit dtype before adding and
    # rounds the dequantized outlier weights to it, we add in fp32 and cast once, and keep the
    # weight in int8 with x's outliers as two int8 digits: within 2 16-bit roundings of max|y|.
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10
    np.testing.assert_allclose(y32, r32, rtol=0, atol=2 * ulp * np.abs(r32).max())


def test_small_m_xla_orientations_agree(rng, monkeypatch):
    # SMALL_ORIENT only swaps the operands of XLA's int8 dot over the stacked digit rows (exact
    # integers): identical outputs
    import importlib

    mi = importlib.import_module("lowbit_jax.ops.matmul_int8")  # the module (ops re-exports the function)
    k, n = 200, 72
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    x = jnp.asarray(_planted(rng, 5, k, rng.choice(k, size=6, replace=False)), jnp.bfloat16)
    outs = {}
    for orient in ("xw", "wx"):
        monkeypatch.setattr(mi, "SMALL_ORIENT", orient)
        outs[orient] = np.asarray(jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, impl="xla"))(x), np.float32)
    np.testing.assert_array_equal(outs["xw"], outs["wx"])
    a = jnp.asarray(rng.integers(-127, 128, (7, k)), jnp.int8)
    np.testing.assert_array_equal(np.asarray(int8_gemm.int8_dot(a, w8.codes, "wx")),
                                  np.asarray(int8_gemm.int8_dot(a, w8.codes, "xw")))
    with pytest.raises(ValueError, match="orient"):
        int8_gemm.int8_dot(jnp.ones((2, 8), jnp.int8), jnp.ones((3, 8), jnp.int8), "xx")


def _unfold(folded, sx_used, d1, s1):
    """(the codes row's step t [M], the values s1 d1 + t r that fold_one_digit represents)."""
    t = np.asarray(sx_used) / 127
    return t, np.asarray(s1[0])[:, None] * np.asarray(d1[0], np.float32) + t[:, None] * np.asarray(folded, np.float32)


def test_small_m_one_digit_folds_residual_into_codes(rng, monkeypatch):
    # SMALL_DIGITS=1: x's outlier columns as one int8 digit d1 (scale s1) plus a residual code in
    # the codes row at the row's own int8 step t = absmax / 127, where those columns are zero.
    # d1 is searched around round(x / s1) so that the residual lands near a multiple of t
    # (s1 / t has the golden ratio's fractional part): every element within t / 2 (the plain
    # fold's bound), and on average far inside it. A row whose other columns are all zero gets
    # the free codes-row scale max|x| / 127 (t then is a second digit's step).
    import importlib

    mi = importlib.import_module("lowbit_jax.ops.matmul_int8")
    k, n, m = 200, 72, 5
    w8 = quant.quantize_int8(jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32))
    cols = rng.choice(k, size=6, replace=False)
    xn = _planted(rng, m, k, cols, value=40.0)
    xn[m - 1] = 0.0  # the last row: only outliers (bitsandbytes' row absmax is then 0)
    xn[m - 1, cols] = rng.uniform(6.0, 40.0, cols.size) * rng.choice([-1.0, 1.0], cols.size)
    x = jnp.asarray(xn, jnp.float32)
    codes, sx, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
    folded, sx_used, (d1, s1) = int8_gemm.fold_one_digit(x, mask, codes, sx)
    assert folded.dtype == jnp.int8 and d1.shape == (1, m, k) and s1.shape == (1, m)
    mk = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(folded)[:, ~mk], np.asarray(codes)[:, ~mk])  # bnb's codes kept
    np.testing.assert_array_equal(np.asarray(sx_used)[:-1], np.asarray(sx)[:-1])
    assert float(sx[-1]) == 0.0 and float(sx_used[-1]) > 0.0
    t, rebuilt = _unfold(folded, sx_used, d1, s1)
    err = np.abs(rebuilt[:, mk] - np.asarray(x)[:, mk]) / t[:, None]
    assert np.all(err <= 0.5 * 1.001)
    assert err[:-1].mean() < 0.05  # the plain fold's mean is ~0.25 (a uniform rounding error)
    assert np.abs(np.asarray(d1[0], np.float32)).max() <= 127 and np.all(np.asarray(d1[0])[:, ~mk] == 0)
    outs = {}
    for digits in (2, 1):
        monkeypatch.setattr(mi, "SMALL_DIGITS", digits)
        outs[digits] = np.asarray(jax.jit(lambda x: ops.matmul_int8(x, w8, 6.0, impl="xla"))(x), np.float64)
    w = np.asarray(quant.int8_vectorwise_dequant(w8.codes, w8.row_absmax), np.float64)
    bound = (t[:, None] * 0.5) * np.abs(w[:, mk]).sum(axis=1)[None, :] + 1e-5 * np.abs(outs[2]).max()
    assert np.all(np.abs(outs[1] - outs[2]) <= bound)
    assert np.any(outs[1] != outs[2])  # the residual's rounding is visible: the switch took effect

def test_one_digit_fold_extreme_outliers_stay_within_one_digit(rng):
    # An outlier 1000x the row's other values: the codes-row residual saturates (|b| <= 127), so
    # the bound falls back to one digit's s1 / 2 (1/254 of the row's max), never worse.
    k, m = 128, 3
    x = rng.uniform(-0.01, 0.01, (m, k)).astype(np.float32)
    cols = rng.choice(k, size=4, replace=False)
    x[:, cols] = rng.uniform(6.0, 12.0, (m, 4)) * rng.choice([-1.0, 1.0], (m, 4))
    x = jnp.asarray(x)
    codes, sx, mask = quant.int8_vectorwise_quant(x, threshold=6.0)
    folded, sx_used, (d1, s1) = int8_gemm.fold_one_digit(x, mask, codes, sx)
    t, rebuilt = _unfold(folded, sx_used, d1, s1)
    mk = np.asarray(mask)
    err = np.abs(rebuilt[:, mk] - np.asarray(x)[:, mk])
    assert np.all(err <= np.asarray(s1[0])[:, None] / 2 * 1.001)
    assert np.all(np.isfinite(rebuilt))
