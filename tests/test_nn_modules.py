"""QuantDense / QuantLinear against nn.Dense / nnx.Linear on the dequantized weights;
quantize_params / quantize_model selection rules, reports, footprints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit_jax import quant
from lowbit_jax.nn import QuantConfig, memory_footprint, quantize_params
from lowbit_jax.nn.linen import QuantDense, quant_context
from lowbit_jax.nn.quantize import dequantize_params
from lowbit_jax.nn.nnx import QuantLinear, QuantWeight, quantize_model

CONFIGS = {
    "nf4": QuantConfig(load_in_4bit=True, quant_type="nf4", compute_dtype="float32", min_size=0),
    "fp4_dq": QuantConfig(load_in_4bit=True, quant_type="fp4", double_quant=True, compute_dtype="float32", min_size=0),
    "int8": QuantConfig(load_in_4bit=False, load_in_8bit=True, int8_threshold=0.0, compute_dtype="float32", min_size=0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quant_dense_matches_dense_on_dequantized(name, rng):
    cfg = CONFIGS[name]
    x = jnp.asarray(rng.standard_normal((3, 5, 96)), jnp.float32)
    qd = QuantDense(40, quant=cfg)
    variables = qd.init(jax.random.key(1), x)
    k = variables["params"]["kernel"]
    assert isinstance(k, quant.QuantizedTensor) and k.shape == (40, 96)
    # bias is zero-initialised: give it data so the test sees it
    params = dict(variables["params"], bias=jnp.asarray(rng.standard_normal(40), jnp.float32))
    y = qd.apply({"params": params}, x)
    w = quant.dequantize(k, jnp.float32).T
    ref = nn.Dense(40, dtype=jnp.float32).apply({"params": {"kernel": w, "bias": params["bias"]}}, x)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    # int8 quantizes the activations too (LLM.int8), so it only matches to int8 precision
    tol = 3e-2 * float(jnp.abs(ref).max()) if name == "int8" else 1e-4
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=tol, rtol=0)


def test_quant_dense_from_fp_dense_tree(rng):
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)

    class Model(nn.Module):
        dense: type = nn.Dense

        @nn.compact
        def __call__(self, x):
            if self.dense is nn.Dense:
                h = nn.Dense(128, name="up")(x)
                return nn.Dense(64, name="lm_head")(nn.gelu(h))
            h = QuantDense(128, name="up", quant=CONFIGS["nf4"])(x)
            return QuantDense(64, name="lm_head", quant=CONFIGS["nf4"])(nn.gelu(h))

    fp = Model().init(jax.random.key(0), x)["params"]
    qp, report = quantize_params(fp, CONFIGS["nf4"])
    assert [r[0] for r in report.quantized] == ["up"] and report.kept[0][0] == "lm_head"
    assert report.bytes_saved > 0 and "up" in str(report)
    y_q = Model(dense=QuantDense).apply({"params": qp}, x)
    # the same tree also runs through the unmodified nn.Dense model inside quant_context
    with quant_context(compute_dtype=jnp.float32):
        y_ctx = Model().apply({"params": qp}, x)
    wq = quant.dequantize(qp["up"]["kernel"], jnp.float32).T
    ref = Model().apply({"params": {**fp, "up": {**fp["up"], "kernel": wq}}}, x)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(ref), atol=1e-4)
    np.testing.assert_allclose(np.asarray(y_ctx), np.asarray(ref), atol=1e-4)
    # and it differs from the fp model (the test can fail)
    assert float(jnp.abs(y_q - Model().apply({"params": fp}, x)).max()) > 1e-3


def test_quant_dense_shape_mismatch_raises(rng):
    x = jnp.ones((2, 64))
    for cfg in (CONFIGS["nf4"], QuantConfig(load_in_4bit=False)):
        params = QuantDense(32, use_bias=False, quant=cfg).init(jax.random.key(0), x)
        with pytest.raises(ValueError, match="kernel shape"):
            QuantDense(16, use_bias=False, quant=cfg).apply(params, x)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(50, 64, name="embed_tokens")(ids)
        h = nn.LayerNorm(name="input_layernorm")(h)
        h = h + nn.Dense(64, name="q_proj")(h)
        h = h + nn.Dense(64, name="v_proj")(h)
        h = h + nn.Dense(64, name="down_proj")(h)
        h = nn.RMSNorm(name="norm")(h)
        return nn.Dense(50, name="lm_head")(h)


def test_quantize_params_skips_exactly_embeddings_norms_head(rng):
    ids = jnp.asarray(rng.integers(0, 50, (2, 7)))
    fp = _Tiny().init(jax.random.key(0), ids)["params"]
    cfg = QuantConfig(load_in_4bit=True, double_quant=True, min_size=0)
    qp, report = quantize_params(fp, cfg)
    assert sorted(r[0] for r in report.quantized) == ["down_proj", "q_proj", "v_proj"]
    assert [r[0] for r in report.kept] == ["lm_head"]
    for name in ("embed_tokens", "input_layernorm", "norm", "lm_head"):
        assert jax.tree.map(lambda a, b: a is b, qp[name], fp[name]), name
        for a, b in zip(jax.tree.leaves(qp[name]), jax.tree.leaves(fp[name])):
            assert a is b
    for name in ("q_proj", "v_proj", "down_proj"):
        assert isinstance(qp[name]["kernel"], quant.Packed4bit) and qp[name]["bias"] is fp[name]["bias"]
    deq = dequantize_params(qp, jnp.float32)
    np.testing.assert_array_equal(np.asarray(deq["q_proj"]["kernel"]), np.asarray(quant.dequantize(qp["q_proj"]["kernel"], jnp.float32).T))
    assert isinstance(qp["q_proj"]["kernel"], quant.Packed4bit) and deq["lm_head"]["kernel"] is fp["lm_head"]["kernel"]
    # include / exclude regexes, qwix-style
    qp2, rep2 = quantize_params(fp, QuantConfig(min_size=0, include=(r"_proj$",), exclude=(r"^v_",)))
    assert sorted(r[0] for r in rep2.quantized) == ["down_proj", "q_proj"]
    _, rep3 = quantize_params(fp, QuantConfig(min_size=64 * 64 + 1))
    assert rep3.quantized == []
    with quant_context(compute_dtype=jnp.float32):
        out = _Tiny().apply({"params": qp}, ids)
    assert out.shape == (2, 7, 50) and bool(jnp.isfinite(out).all())
    fq, ff = memory_footprint(qp), memory_footprint(fp)
    assert fq.total_params == ff.total_params and fq.total_bytes < ff.total_bytes
    assert "nf4+dq" in str(fq)
    with pytest.raises(ValueError, match="config"):
        quantize_params(fp, {"load_in_4bit": True})


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_quant_linear_matches_nnx_linear(name, rng):
    cfg = CONFIGS[name]
    x = jnp.asarray(rng.standard_normal((6, 80)), jnp.float32)
    lin = nnx.Linear(80, 48, rngs=nnx.Rngs(0))
    lin.bias.value = jnp.asarray(rng.standard_normal(48), jnp.float32)
    ql = QuantLinear.from_linear(lin, cfg)
    assert isinstance(ql.kernel, QuantWeight)
    w = quant.dequantize(ql.kernel.value, jnp.float32).T
    ref_lin = nnx.Linear(80, 48, rngs=nnx.Rngs(0))
    ref_lin.kernel.value, ref_lin.bias.value = w, lin.bias.value
    tol = 3e-2 * float(jnp.abs(ref_lin(x)).max()) if name == "int8" else 1e-4
    np.testing.assert_allclose(np.asarray(ql(x)), np.asarray(ref_lin(x)), atol=tol)
    fresh = QuantLinear(80, 48, quant=cfg, rngs=nnx.Rngs(3))
    assert fresh(x).shape == (6, 48)
    # no QuantWeight leaf is an nnx.Param, so Param filters never see uint8 codes
    assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in jax.tree.leaves(nnx.state(fresh, nnx.Param)))


class _NnxTiny(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(50, 64, rngs=rngs)
        self.norm = nnx.RMSNorm(64, rngs=rngs)
        self.q_proj = nnx.Linear(64, 64, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(64, 64, rngs=rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(64, 50, rngs=rngs)

    def __call__(self, ids):
        h = self.norm(self.embed_tokens(ids))
        h = h + self.q_proj(h)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(h)


def test_quantize_model_nnx_in_place(rng):
    ids = jnp.asarray(rng.integers(0, 50, (2, 5)))
    model = _NnxTiny(nnx.Rngs(0))
    before = memory_footprint(model)
    report = quantize_model(model, QuantConfig(min_size=0, compute_dtype="float32"))
    assert sorted(r[0] for r in report.quantized) == ["layers/0", "layers/1", "q_proj"]
    assert [r[0] for r in report.kept] == ["lm_head"]
    assert isinstance(model.q_proj, QuantLinear) and isinstance(model.layers[1], QuantLinear)
    assert isinstance(model.lm_head, nnx.Linear)
    after = memory_footprint(model)
    assert after.total_bytes < before.total_bytes and after.total_params == before.total_params
    assert model(ids).shape == (2, 5, 50)
