"""8-bit optimizers behave as optax optimizers: jit, chain, masks, MultiSteps, injected
hyperparameters, orbax checkpoints, offloaded states; and they train like their 32-bit peers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowbit_jax.optim import (
    ScaleByAdam8bitState,
    adagrad8bit,
    adam8bit,
    adamw8bit,
    ademamix8bit,
    lion8bit,
    rmsprop8bit,
    sgd8bit,
    state_nbytes,
)
from lowbit_jax.quant import Blockwise8bit


def _params(rng):
    return {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((64, 96)), jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal((96,)), jnp.float32)},
        "embed": jnp.asarray(rng.standard_normal((128, 40)), jnp.bfloat16),
    }


def _grads(rng, params):
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _steps(tx, params, rng, n=3):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(n):
        u, state = update(_grads(rng, params), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("make", [
    lambda: adamw8bit(1e-3, fused=False), lambda: adam8bit(1e-3), lambda: lion8bit(1e-4),
    lambda: sgd8bit(1e-2), lambda: rmsprop8bit(1e-3), lambda: adagrad8bit(1e-2),
    lambda: ademamix8bit(1e-3, t_alpha=5, t_beta3=5),
])
def test_each_optimizer_steps_under_jit(rng, make):
    params = _params(rng)
    new, state = _steps(make(), params, rng)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert bool(jnp.all(jnp.isfinite(b.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) > 0
    moments = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, Blockwise8bit))
               if isinstance(x, Blockwise8bit)]
    assert moments and all(m.codes.dtype == jnp.uint8 for m in moments)


def test_composes_with_optax(rng):
    params = _params(rng)
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), adamw8bit(sched, fused=False))
    _steps(tx, params, rng)
    # masked: only the dense kernel gets the 8-bit optimizer
    mask = {"dense": {"kernel": True, "bias": False}, "embed": False}
    _steps(optax.masked(adamw8bit(1e-3, fused=False), mask), params, rng)
    # weight-decay mask as a callable, as optax.adamw takes it
    _steps(adamw8bit(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p), fused=False), params, rng)
    # gradient accumulation: the inner state only moves every k steps
    ms = optax.MultiSteps(adamw8bit(1e-3, fused=False), every_k_schedule=2)
    _, state = _steps(ms, params, rng, n=3)
    assert int(state.inner_opt_state[0].count) == 1
    # injected hyperparameters: learning rate and b1 as traced state
    tx = optax.inject_hyperparams(adamw8bit)(learning_rate=1e-3, b1=0.9, fused=False)
    _, state = _steps(tx, params, rng)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-3)


def test_state_layout_and_bytes(rng):
    params = {"big": jnp.zeros((512, 512)), "small": jnp.zeros((16, 16))}
    state = adamw8bit(1e-3, fused=False).init(params)[0]
    assert isinstance(state, ScaleByAdam8bitState)
    assert isinstance(state.mu["big"], Blockwise8bit) and state.mu["big"].codes.shape == (512, 512)
    assert state.mu["big"].absmax.shape == (512 * 512 // 256,)
    assert state.mu["small"].dtype == jnp.float32  # < 4096 elements: fp32 like bitsandbytes
    big = state_nbytes((state.mu["big"], state.nu["big"])) / (512 * 512)
    assert 2.03 <= big <= 2.04  # codes 2 B + absmax 2 * 4/256 B (+ the two 1 KiB maps)


def test_orbax_round_trip(rng, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _params(rng)
    _, state = _steps(adamw8bit(1e-3, fused=False), params, rng)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = ckpt.restore(tmp_path / "opt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(restored[0].mu["dense"]["kernel"], Blockwise8bit)


def test_offloaded_state_matches_on_device(rng):
    params = _params(rng)
    grads = [_grads(rng, params) for _ in range(3)]
    results = []
    for offload in (False, True):
        tx = adamw8bit(1e-3, fused=False, offload_state=offload)
        p, state = params, tx.init(params)
        update = jax.jit(tx.update)
        for g in grads:
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
        results.append((p, state))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves((results[1][1][0].mu, results[1][1][0].nu))}
    assert kinds == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="b1"):
        adamw8bit(1e-3, b1=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        adamw8bit(1e-3, weight_decay=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        sgd8bit(1e-2, momentum=0.0)
    with pytest.raises(ValueError, match="min_8bit_size"):
        adam8bit(1e-3, min_8bit_size=0)


def test_trains_like_32bit_adamw(rng):
    """A small MLP regression: 8-bit and 32-bit AdamW end at the same loss (CI-sized version of
    benchmarks/optim_convergence.py)."""
    x = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((32, 1)), jnp.float32)
    y = jnp.tanh(x @ w_true) + 0.05 * jnp.asarray(rng.standard_normal((256, 1)), jnp.float32)
    params0 = {"w1": jnp.asarray(rng.standard_normal((32, 128)) * 0.2, jnp.float32),
               "w2": jnp.asarray(rng.standard_normal((128, 1)) * 0.1, jnp.float32)}

    def loss_fn(p):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    def train(tx):
        p, s = params0, tx.init(params0)

        @jax.jit
        def step(p, s):
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        for _ in range(200):
            p, s, loss = step(p, s)
        return float(loss_fn(p))

    start = float(loss_fn(params0))
    l8 = train(adamw8bit(3e-3, fused=False))
    l32 = train(optax.adamw(3e-3))
    print(f"loss start {start:.4f}, adamw8bit {l8:.4f}, optax.adamw {l32:.4f}")
    assert l8 < 0.2 * start and l32 < 0.2 * start
    assert abs(l8 - l32) <= 0.15 * l32 + 1e-3


def test_sharded_params_update_like_unsharded(rng):
    """Parameters sharded over a device mesh: the jitted 8-bit step runs, its codes keep the
    parameter's shape (so they shard like it), and the result equals the single-device one."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several devices (scripts/test.sh forces 8 host devices)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices[: 2 * (len(devices) // 2)]).reshape(2, -1), ("data", "model"))
    params = {"w": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)}
    tx = adamw8bit(1e-2, fused=False)
    sharding = {"w": NamedSharding(mesh, P("data", "model"))}
    p_sh = jax.device_put(params, sharding)
    g_sh = jax.device_put(grads, sharding)
    s_sh = jax.jit(tx.init)(p_sh)
    u_sh, s_sh = jax.jit(tx.update)(g_sh, s_sh, p_sh)
    u, s = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(u_sh["w"]), np.asarray(u["w"]))
    np.testing.assert_array_equal(np.asarray(s_sh[0].mu["w"].codes), np.asarray(s[0].mu["w"].codes))
    assert s_sh[0].mu["w"].codes.shape == (256, 64)
    # a state placed with the parameter's sharding is accepted as is
    codes = jax.device_put(s_sh[0].mu["w"].codes, sharding["w"])
    assert codes.sharding.is_equivalent_to(sharding["w"], 2)
