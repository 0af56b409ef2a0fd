"""8-bit optimizers against bitsandbytes' own (CPU) over many steps on random gradients.

Same start, same gradients; bitsandbytes updates torch parameters in place, we apply optax
updates. Parameters agree to float rounding (the only differences are fp32 evaluation order:
bias corrections in fp32 instead of double, ``p - lr*(u + wd*p)`` instead of
``p*(1-lr*wd) - lr*u``), and the 8-bit state codes agree except for values sitting on a
rounding boundary; the fraction that differs is printed and bounded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowbit_jax.optim import adam8bit, adamw8bit, ademamix8bit, lion8bit, sgd8bit
from lowbit_jax.quant import Blockwise8bit

# 6144 (8-bit, whole blocks), 11100 (8-bit, ragged last block), 600 (< 4096: fp32 states)
SHAPES = [(64, 96), (300, 37), (20, 30)]
STEPS = 25
LR = 1e-2


def _run(torch, rng, bnb_cls, bnb_kwargs, tx, grad_scale=1.0):
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = bnb_cls(tparams, **bnb_kwargs)
    jparams = [jnp.asarray(p) for p in params]
    state = tx.init(jparams)
    update = jax.jit(tx.update)
    for _ in range(STEPS):
        grads = [(rng.standard_normal(s) * grad_scale).astype(np.float32) for s in SHAPES]
        for t, g in zip(tparams, grads):
            t.grad = torch.from_numpy(g)
        opt.step()
        u, state = update([jnp.asarray(g) for g in grads], state, jparams)
        jparams = optax.apply_updates(jparams, u)
    return opt, tparams, jparams, state


def _moments(state):
    """The first NamedTuple state in a chain's state tuple."""
    return state[0]


def _assert_params_close(ours, theirs, atol, label, max_abs):
    """Nearly every element within ``atol``; an element whose state code rounded the other way
    at a boundary drifts further, so those are counted (<= 0.1%) and bounded by ``max_abs``."""
    diff = np.abs(np.asarray(ours) - theirs.detach().numpy())
    off = float(np.mean(diff > atol))
    print(f"{label}: params beyond {atol:g}: {off:.2e} (max |diff| {diff.max():.2e})")
    assert off <= 1e-3, off
    assert diff.max() <= max_abs, diff.max()


def _code_mismatch(opt, tparam, ours, key):
    theirs = opt.state[tparam][key].numpy()
    return float(np.mean(theirs != np.asarray(ours.codes)))


@pytest.fixture(scope="module")
def bnb_optim(torch):
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return pytest.importorskip("bitsandbytes.optim")


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_adam_family_matches_bitsandbytes(torch, bnb_optim, rng, kind):
    if kind == "adamw":
        bnb_cls, kw = bnb_optim.AdamW8bit, dict(lr=LR, weight_decay=1e-2)
        tx = adamw8bit(LR, weight_decay=1e-2, fused=False)
    else:
        bnb_cls, kw = bnb_optim.Adam8bit, dict(lr=LR)
        tx = adam8bit(LR)
    opt, tparams, jparams, state = _run(torch, rng, bnb_cls, kw, tx)
    moments = _moments(state)
    for i, shape in enumerate(SHAPES):
        _assert_params_close(jparams[i], tparams[i], 2e-5, f"{kind} {shape}", max_abs=0.1 * LR * STEPS)
        mu, nu = moments.mu[i], moments.nu[i]
        if np.prod(shape) >= 4096:
            assert isinstance(mu, Blockwise8bit) and isinstance(nu, Blockwise8bit)
            m_diff = _code_mismatch(opt, tparams[i], mu, "state1")
            v_diff = _code_mismatch(opt, tparams[i], nu, "state2")
            print(f"{kind} {shape}: state codes differing m {m_diff:.2e} v {v_diff:.2e}")
            assert m_diff <= 1e-3 and v_diff <= 1e-3
            np.testing.assert_allclose(np.asarray(mu.absmax), opt.state[tparams[i]]["absmax1"].numpy(), rtol=1e-4)
            np.testing.assert_allclose(np.asarray(nu.absmax), opt.state[tparams[i]]["absmax2"].numpy(), rtol=1e-4)
        else:
            assert not isinstance(mu, Blockwise8bit)  # bitsandbytes' min_8bit_size rule
            np.testing.assert_allclose(np.asarray(mu), opt.state[tparams[i]]["state1"].numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(np.asarray(nu), opt.state[tparams[i]]["state2"].numpy(), rtol=1e-5, atol=1e-9)


def test_lion_matches_bitsandbytes(torch, bnb_optim, rng):
    lr = 1e-3
    opt, tparams, jparams, state = _run(
        torch, rng, bnb_optim.Lion8bit, dict(lr=lr, weight_decay=1e-2), lion8bit(lr, weight_decay=1e-2)
    )
    for i, shape in enumerate(SHAPES):
        diff = np.abs(np.asarray(jparams[i]) - tparams[i].detach().numpy())
        # a sign() of a value within rounding of 0 may flip: that element moves 2*lr apart
        flipped = float(np.mean(diff > 1e-5))
        print(f"lion {shape}: params off by a flipped sign {flipped:.2e}")
        assert flipped <= 2e-3 and diff.max() <= 2 * lr * STEPS
        if np.prod(shape) >= 4096:
            m_diff = _code_mismatch(opt, tparams[i], state[0].mu[i], "state1")
            print(f"lion {shape}: state codes differing {m_diff:.2e}")
            assert m_diff <= 1e-3


@pytest.mark.parametrize("schedules", [False, True])
def test_ademamix_matches_bitsandbytes(torch, bnb_optim, rng, schedules):
    t = dict(t_alpha=10, t_beta3=10) if schedules else {}
    opt, tparams, jparams, state = _run(
        torch, rng, bnb_optim.AdEMAMix8bit, dict(lr=LR, weight_decay=1e-2, **t),
        ademamix8bit(LR, weight_decay=1e-2, **t),
    )
    for i, shape in enumerate(SHAPES):
        # alpha = 5 amplifies the slow EMA: its fp32 rounding (and any one-code difference) moves p ~5x more
        _assert_params_close(jparams[i], tparams[i], 1e-4, f"ademamix {shape}", max_abs=0.1 * LR * STEPS)
        if np.prod(shape) >= 4096:
            theirs = opt.state[tparams[i]]["state1"].numpy()  # [2, *shape]: m1, m2
            m1 = float(np.mean(theirs[0] != np.asarray(state[0].m1[i].codes)))
            m2 = float(np.mean(theirs[1] != np.asarray(state[0].m2[i].codes)))
            nu = _code_mismatch(opt, tparams[i], state[0].nu[i], "state2")
            print(f"ademamix {shape}: state codes differing m1 {m1:.2e} m2 {m2:.2e} nu {nu:.2e}")
            assert max(m1, m2, nu) <= 1e-3


def test_sgd_momentum_matches_bitsandbytes(torch, bnb_optim, rng):
    opt, tparams, jparams, state = _run(
        torch, rng, bnb_optim.SGD8bit, dict(lr=LR, momentum=0.9), sgd8bit(LR, momentum=0.9)
    )
    for i, shape in enumerate(SHAPES):
        _assert_params_close(jparams[i], tparams[i], 2e-5, f"sgd {shape}", max_abs=0.1 * LR * STEPS)
        if np.prod(shape) >= 4096:
            m_diff = _code_mismatch(opt, tparams[i], state[0].trace[i], "state1")
            print(f"sgd {shape}: state codes differing {m_diff:.2e}")
            assert m_diff <= 1e-3


def test_adamw_bf16_params_match_bitsandbytes(torch, bnb_optim, rng):
    """bf16 parameters: both update in fp32 and round p once to bf16."""
    shapes = SHAPES[:2]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tparams = [torch.nn.Parameter(torch.from_numpy(p).bfloat16()) for p in params]
    opt = bnb_optim.AdamW8bit(tparams, lr=LR)
    jparams = [jnp.asarray(p, jnp.bfloat16) for p in params]
    tx = adamw8bit(LR, fused=False)
    state, update = tx.init(jparams), jax.jit(tx.update)
    for _ in range(STEPS):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for t, g in zip(tparams, grads):
            t.grad = torch.from_numpy(g).bfloat16()
        opt.step()
        u, state = update([jnp.asarray(g, jnp.bfloat16) for g in grads], state, jparams)
        jparams = optax.apply_updates(jparams, u)
    for i, shape in enumerate(shapes):
        ours = np.asarray(jparams[i].astype(jnp.float32))
        theirs = tparams[i].detach().float().numpy()
        beyond_ulp = float(np.mean(np.abs(ours - theirs) > np.abs(theirs) * 2.0**-7))
        m_diff = _code_mismatch(opt, tparams[i], state[0].mu[i], "state1")
        print(f"adamw bf16 {shape}: params beyond 1 bf16 ulp {beyond_ulp:.2e}, m codes differing {m_diff:.2e}")
        assert beyond_ulp <= 1e-3 and m_diff <= 1e-3


def test_parity_detects_a_wrong_beta(torch, bnb_optim, rng):
    """The comparison above can fail: b2 off by 1e-3 is visible in the parameters."""
    opt, tparams, jparams, _ = _run(
        torch, rng, bnb_optim.AdamW8bit, dict(lr=LR, weight_decay=1e-2), adamw8bit(LR, b2=0.998, fused=False)
    )
    assert np.abs(np.asarray(jparams[0]) - tparams[0].detach().numpy()).max() > 2e-5
