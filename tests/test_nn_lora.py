"""LoRA/QLoRA: only adapters train, frozen 4-bit bases stay bit-identical, jit + remat,
merge/unmerge, PEFT's parameter printout -- Linen and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowbit_jax import quant
from lowbit_jax.nn import (
    LoraConfig,
    QuantConfig,
    add_lora,
    combine,
    merge_lora,
    prepare_for_kbit_training,
    print_trainable_parameters,
    quantize_params,
    split_trainable,
    trainable_mask,
    unmerge_lora,
)
from lowbit_jax.nn import nnx as lnnx
from lowbit_jax.nn.linen import quant_context

QCFG = QuantConfig(load_in_4bit=True, double_quant=True, compute_dtype="float32", min_size=0)
LCFG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="input_layernorm")(x)
        h = x + nn.Dense(64, name="q_proj")(h) * nn.Dense(64, name="v_proj")(h)
        return h + nn.Dense(64, name="o_proj")(nn.gelu(h))


def _setup(rng):
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    fp = Block().init(jax.random.key(0), x)["params"]
    qp, _ = quantize_params(fp, QCFG)
    params = prepare_for_kbit_training(add_lora(qp, LCFG, jax.random.key(1)))
    return x, y, fp, params


def _loss(trainable, frozen, x, y, remat=False):
    def f(t):
        with quant_context(lora=LCFG):
            out = Block().apply({"params": combine(t, frozen)}, x)
        return jnp.mean((out - y) ** 2)

    return (jax.checkpoint(f) if remat else f)(trainable)


def test_linen_qlora_trains_only_adapters(rng, capsys):
    x, y, _, params = _setup(rng)
    trainable, frozen = split_trainable(params)
    assert sorted(trainable) == ["q_proj", "v_proj"] and sorted(trainable["q_proj"]) == ["lora_A", "lora_B"]
    assert trainable["q_proj"]["lora_A"].shape == (64, 4) and not trainable["q_proj"]["lora_B"].any()
    assert jax.tree.map(bool, trainable_mask(params))["q_proj"] == {
        "kernel": False,  # a prefix of the Packed4bit subtree, as optax.masked accepts
        "bias": False,
        "lora_A": True,
        "lora_B": True,
    }
    frozen_before = jax.tree.map(np.asarray, frozen)
    n_train, n_all = print_trainable_parameters(params)
    assert n_train == 2 * (64 * 4 + 4 * 64) and n_all == n_train + 3 * (64 * 64 + 64) + 2 * 64
    assert capsys.readouterr().out.startswith(f"trainable params: {n_train:,} || all params: {n_all:,} || trainable%:")

    opt = optax.adamw(1e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(_loss)(t, frozen, x, y, remat=True)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss, g

    losses = []
    t = trainable
    for _ in range(6):
        t, state, loss, g = step(t, state)
        losses.append(float(loss))
    assert jax.tree.structure(g) == jax.tree.structure(trainable)
    assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(g)), "every adapter gets a gradient"
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))

    # Differentiate every float leaf, quantized-kernel scales included: only the adapters,
    # biases and norms can move; the frozen 4-bit weights get exactly zero.
    full = combine(t, frozen)
    floats = jax.tree.map(lambda a: a if jnp.issubdtype(a.dtype, jnp.floating) else None, full)
    ints = jax.tree.map(lambda a: None if jnp.issubdtype(a.dtype, jnp.floating) else a, full)

    def loss_all(fl):
        merged = jax.tree.map(lambda a, b: a if b is None else b, fl, ints, is_leaf=lambda v: v is None)
        with quant_context(lora=LCFG):
            return jnp.mean((Block().apply({"params": merged}, x) - y) ** 2)

    g_all = jax.grad(loss_all)(floats)
    for name in ("q_proj", "v_proj", "o_proj"):
        for leaf in jax.tree.leaves(g_all[name]["kernel"]):
            assert not leaf.any(), name
        assert float(jnp.abs(g_all[name]["bias"]).max()) > 0
    assert float(jnp.abs(g_all["q_proj"]["lora_A"]).max()) > 0


def test_prepare_for_kbit_training_casts(rng):
    x, _, _, params = _setup(rng)
    bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    out = prepare_for_kbit_training(bf)
    assert out["input_layernorm"]["scale"].dtype == jnp.float32
    assert out["q_proj"]["lora_A"].dtype == jnp.float32 and out["q_proj"]["bias"].dtype == jnp.bfloat16
    assert out["q_proj"]["kernel"].packed is bf["q_proj"]["kernel"].packed


def test_linen_merge_unmerge_round_trip(rng):
    x, _, fp, params = _setup(rng)
    # give the adapters non-trivial values so merging changes something
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.asarray(rng.standard_normal(a.shape) * 0.1, a.dtype)
        if getattr(p[-1], "key", None) == "lora_B" else a,
        params,
        is_leaf=lambda a: isinstance(a, quant.QuantizedTensor),
    )
    with quant_context(lora=LCFG):
        ref = Block().apply({"params": params}, x)
    trainable, _ = split_trainable(params)

    merged = merge_lora(params, LCFG)  # into bf16
    assert merged["q_proj"]["kernel"].dtype == jnp.bfloat16 and "lora_A" not in merged["q_proj"]
    assert isinstance(merged["o_proj"]["kernel"], quant.Packed4bit)
    with quant_context():
        y_bf16 = Block().apply({"params": merged}, x)
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(y_bf16), np.asarray(ref), atol=2e-2 * scale)

    requant = merge_lora(params, LCFG, requantize=True)
    assert isinstance(requant["q_proj"]["kernel"], quant.Packed4bit)
    with quant_context():
        y_q = Block().apply({"params": requant}, x)
    err = float(jnp.abs(y_q - ref).max())
    assert 0 < err < 0.2 * scale

    back = unmerge_lora(merged, trainable, LCFG)
    w0 = quant.dequantize(params["q_proj"]["kernel"], jnp.float32).T
    np.testing.assert_allclose(np.asarray(back["q_proj"]["kernel"], np.float32), np.asarray(w0), atol=2e-2)
    with quant_context(lora=LCFG):
        y_back = Block().apply({"params": back}, x)
    np.testing.assert_allclose(np.asarray(y_back), np.asarray(ref), atol=2e-2 * scale)

    # full-precision base: exact to float32 rounding
    fpl = add_lora(fp, LCFG, jax.random.key(2))
    fpl["q_proj"]["lora_B"] = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    t_fp, _ = split_trainable(fpl)
    rt = unmerge_lora(merge_lora(fpl, LCFG), t_fp, LCFG)
    np.testing.assert_allclose(np.asarray(rt["q_proj"]["kernel"]), np.asarray(fp["q_proj"]["kernel"]), atol=1e-5)
    assert not np.allclose(np.asarray(merge_lora(fpl, LCFG)["q_proj"]["kernel"]), np.asarray(fp["q_proj"]["kernel"]))


def test_lora_config_errors(rng):
    _, _, fp, _ = _setup(rng)
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(fp, LoraConfig(target_modules=["nope"]), jax.random.key(0))
    with pytest.raises(ValueError, match="r must"):
        LoraConfig(r=0)
    assert LoraConfig(target_modules=r".*_proj").matches("layers/0/q_proj")
    assert not LoraConfig(target_modules=["proj"]).matches("q_proj")


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.q_proj = nnx.Linear(64, 64, rngs=rngs)
        self.v_proj = nnx.Linear(64, 64, rngs=rngs)
        self.o_proj = nnx.Linear(64, 64, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        h = x + self.q_proj(h) * self.v_proj(h)
        return h + self.o_proj(nnx.gelu(h))


def test_nnx_qlora_train_merge(rng, capsys):
    x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
    model = NnxBlock(nnx.Rngs(0))
    lnnx.quantize_model(model, QCFG)
    assert lnnx.apply_lora(model, LCFG, rngs=nnx.Rngs(1)) == ["q_proj", "v_proj"]
    lnnx.prepare_for_kbit_training(model)
    assert isinstance(model.q_proj, lnnx.LoRALinear) and isinstance(model.o_proj, lnnx.QuantLinear)
    n_train, _ = print_trainable_parameters(model)
    assert n_train == 2 * (64 * 4 + 4 * 64) and "trainable params: 1,024" in capsys.readouterr().out
    q_before = jax.tree.map(np.asarray, nnx.state(model, lnnx.QuantWeight))
    base_params = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
    p_before = jax.tree.map(np.asarray, nnx.state(model, base_params))
    assert len(jax.tree.leaves(p_before)) == 5  # norm scale/bias + three biases

    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((nnx.remat(lambda mm, xx: mm(xx))(m, x) - y) ** 2)

        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, g)
        return loss, g

    losses = [float(step(model, opt)[0]) for _ in range(6)]
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(q_before), jax.tree.leaves(nnx.state(model, lnnx.QuantWeight))):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(p_before), jax.tree.leaves(nnx.state(model, base_params))):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert float(jnp.abs(model.q_proj.lora_B.value).max()) > 0

    ref = model(x)
    k0_q = model.q_proj.base.kernel.value
    k0 = jax.tree.map(np.asarray, k0_q)
    model.q_proj.merge()
    assert model.q_proj.base.kernel.value.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref), atol=2e-2 * float(jnp.abs(ref).max()))
    model.q_proj.unmerge()  # exact: the quantized base comes back bit for bit
    for a, b in zip(jax.tree.leaves(k0), jax.tree.leaves(model.q_proj.base.kernel.value)):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref), atol=1e-5)
    model.q_proj.merge(requantize=True)
    w_merged = quant.dequantize(model.q_proj.base.kernel.value, jnp.float32)
    model.q_proj.unmerge()
    w_back = quant.dequantize(model.q_proj.base.kernel.value, jnp.float32)
    w0 = quant.dequantize(k0_q, jnp.float32)
    assert float(jnp.abs(w_merged - w0).max()) > 1e-3
    # two NF4 roundings (merge, unmerge): about two code gaps at worst, small on average
    assert float(jnp.abs(w_back - w0).max()) < 0.35 * float(jnp.abs(w0).max())
    assert float(jnp.abs(w_back - w0).mean()) < 0.15 * float(jnp.abs(w0).mean())
    ref2 = model(x)
    lnnx.merge_and_unload(model, requantize=True)
    assert isinstance(model.q_proj, lnnx.QuantLinear) and isinstance(model.q_proj.kernel, lnnx.QuantWeight)
    err = jnp.abs(model(x) - ref2)
    # one more NF4 rounding of q_proj and v_proj, amplified by their product: ~12% measured
    assert 0 < float(err.mean()) < 0.25 * float(jnp.abs(ref2).mean())


def test_quant_dense_lora_dropout_and_optax_mask(rng):
    from lowbit_jax.nn.linen import QuantDense

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return QuantDense(32, name="q_proj", quant=QCFG)(x)

    x = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"])
    params = add_lora(M().init(jax.random.key(0), x)["params"], cfg, jax.random.key(1))
    params["q_proj"]["lora_B"] = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    base = M().apply({"params": params}, x)
    with quant_context(lora=cfg):
        det = M().apply({"params": params}, x)
    with quant_context(lora=cfg, deterministic=False):
        drop1 = M().apply({"params": params}, x, rngs={"dropout": jax.random.key(3)})
        drop2 = M().apply({"params": params}, x, rngs={"dropout": jax.random.key(4)})
    a, b = params["q_proj"]["lora_A"], params["q_proj"]["lora_B"]
    np.testing.assert_allclose(np.asarray(det - base), np.asarray(x @ a @ b * cfg.scale), atol=1e-4)
    assert float(jnp.abs(drop1 - det).max()) > 1e-3 and float(jnp.abs(drop1 - drop2).max()) > 1e-3
    # optax.masked over the whole tree: the quantized kernel is masked out, its state empty
    tx = optax.masked(optax.adam(1e-3), trainable_mask(params))
    state = tx.init(params)
    mu = state.inner_state[0].mu
    assert mu["q_proj"]["lora_A"].shape == (64, 4)
    assert not any(hasattr(leaf, "dtype") and leaf.dtype == jnp.uint8 for leaf in jax.tree.leaves(mu))
