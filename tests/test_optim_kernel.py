"""The fused Pallas AdamW kernel (interpret mode on the CPU) against its jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowbit_jax import formats
from lowbit_jax.optim import adamw8bit
from lowbit_jax.optim.fused import adam8bit_step_fused, adam8bit_step_reference, adam_hyper
from lowbit_jax.quant import quantize_blockwise


def _state(rng, shape, signed):
    x = rng.standard_normal(shape) * 0.1 if signed else rng.random(shape) * 0.01
    x.reshape(-1)[:256] = 0.0  # block 0 all zero (with a zero gradient there it stays zero)
    return quantize_blockwise(jnp.asarray(x, jnp.float32), code=formats.dynamic_map(signed), blocksize=256)


@pytest.mark.parametrize("shape,dtype,quantizer", [
    ((64, 256), "float32", "lut"),      # whole blocks, 4 programs of ROWS blocks
    ((37, 300), "float32", "lut"),      # ragged last block (11100 values)
    ((37, 300), "float32", "bsearch"),
    ((37, 300), "float32", "segments"),
    ((48, 128), "bfloat16", "segments"),
    ((48, 128), "bfloat16", "lut"),     # bf16 parameters
    ((37, 300), "float32", "segtable"),
    ((37, 300), "float32", "logtable"),
    ((48, 128), "bfloat16", "logtable"),
    ((63, 260), "float32", "logtable+rows8"),  # 64 blocks, the last ragged: 8 blocks a program
])
def test_kernel_matches_reference(rng, shape, dtype, quantizer):
    options = dict(quantizer=quantizer)
    if quantizer.endswith("+rows8"):
        options = dict(quantizer=quantizer.split("+")[0], rows=8)
    p = jnp.asarray(rng.standard_normal(shape), dtype)
    g = rng.standard_normal(shape)
    g.reshape(-1)[:256] = 0.0  # with block 0 of both states zero: an all-zero block stores code 0
    g = jnp.asarray(g, dtype)
    mq, vq = _state(rng, shape, True), _state(rng, shape, False)
    hyper = adam_hyper(0.9, 0.999, 1e-8, 1e-2, 1e-2, 7)
    p_ref, m_ref, v_ref = adam8bit_step_reference(hyper, p, g, mq, vq)
    p_k, m_k, v_k = jax.jit(
        lambda *a: adam8bit_step_fused(*a, interpret=True, **options)
    )(hyper, p, g, mq, vq)
    assert p_k.dtype == p.dtype and m_k.codes.shape == shape
    atol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.asarray(p_k, np.float32), np.asarray(p_ref, np.float32), rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(m_k.absmax), np.asarray(m_ref.absmax), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v_k.absmax), np.asarray(v_ref.absmax), rtol=1e-6)
    m_off = float(np.mean(np.asarray(m_k.codes) != np.asarray(m_ref.codes)))
    v_off = float(np.mean(np.asarray(v_k.codes) != np.asarray(v_ref.codes)))
    print(f"{shape} {dtype} {quantizer}: codes differing m {m_off:.2e} v {v_off:.2e}")
    assert m_off <= 1e-3 and v_off <= 1e-3
    for q in (m_k, v_k):  # the all-zero block: absmax 0, code 0 (bitsandbytes' convention)
        assert float(q.absmax[0]) == 0.0 and not np.any(np.asarray(q.codes).reshape(-1)[:256])
    # the step did something: state and params moved
    assert float(np.mean(np.asarray(m_k.codes) != np.asarray(mq.codes))) > 0.5


@pytest.mark.parametrize("signed", [True, False])
def test_segments_reproduce_rounding_table(signed):
    """The "segments" rounding (piecewise guess + one packed-threshold read) gives the 64 KiB
    table's code for every one of its 65536 bins, run through the kernel's own jnp code."""
    from lowbit_jax.optim import _state
    from pallas_kernels.optim_8bit import _segment_codes, _segtable_codes, segment_table

    pieces, packed = _state.state_segments(signed)
    assert 2 <= len(pieces) <= 16  # few pieces: each costs the kernel three selects a value
    bins = jnp.arange(65536, dtype=jnp.int32).reshape(256, 256)
    codes = jax.jit(lambda b, t: _segment_codes(b, t, pieces))(bins, jnp.asarray(packed))
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), _state.state_lut(signed))
    # the same pieces read from the segment table (piece index, two gathers) instead of selects
    table = jnp.asarray(segment_table(pieces, packed))
    codes = jax.jit(lambda b, t: _segtable_codes(b, t, pieces))(bins, table)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), _state.state_lut(signed))


@pytest.mark.parametrize("signed", [True, False])
def test_log_table_reproduces_rounding_table(signed):
    """"logtable" (one gather of a coarse, log-spaced line table) gives the 64 KiB table's code
    for every one of its 65536 bins through the kernel's own jnp code, and its numpy twin
    (the builder's check) agrees."""
    from lowbit_jax.optim import _state
    from pallas_kernels.optim_8bit import _logtable_codes, _logtable_codes_np

    table, params = _state.state_log_table(signed)
    assert table.dtype == np.int32 and table.size <= 4096  # a few KiB: stays in L1
    bins = jnp.arange(65536, dtype=jnp.int32).reshape(256, 256)
    codes = jax.jit(lambda b, t: _logtable_codes(b, t, params))(bins, jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), _state.state_lut(signed))
    np.testing.assert_array_equal(_logtable_codes_np(np.arange(65536), table, params), _state.state_lut(signed))


@pytest.mark.parametrize("signed", [True, False])
def test_state_tables_send_bin_zero_to_code_zero(signed):
    # the kernel stores all-zero blocks as code 0 by sending them to bin 0 (_lut_index)
    from lowbit_jax.optim import _state

    assert int(_state.state_lut(signed)[0]) == 0


def test_log_table_rejects_bad_tables():
    from pallas_kernels.optim_8bit import log_table

    with pytest.raises(ValueError, match="non-decreasing"):
        log_table(np.arange(65536)[::-1] % 256)
    # irregular code steps inside wide coarse bins cannot be one line a coarse bin: refused
    gaps = np.random.default_rng(0).integers(1, 4, 255)  # 255 steps 1-3 bins apart at the top
    lut = np.zeros(65536, np.int64)
    for pos in 65535 - np.cumsum(gaps):
        lut[pos:] += 1
    with pytest.raises(ValueError, match="cannot be reproduced"):
        log_table(lut)


def test_fused_optax_matches_chain(rng):
    """adamw8bit(fused) == the jnp chain over steps, with a schedule and a weight-decay mask."""
    shapes = [(40, 128), (10, 10)]
    params = {"w": jnp.asarray(rng.standard_normal(shapes[0]), jnp.float32),
              "b": jnp.asarray(rng.standard_normal(shapes[1]), jnp.float32)}
    mask = {"w": True, "b": False}
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    txa = adamw8bit(sched, weight_decay=0.1, mask=mask, fused=False)
    txb = adamw8bit(sched, weight_decay=0.1, mask=mask, fused=True, interpret=True)
    pa, pb, sa, sb = params, params, txa.init(params), txb.init(params)
    ua, ub = jax.jit(txa.update), jax.jit(txb.update)
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u, sa = ua(g, sa, pa)
        pa = optax.apply_updates(pa, u)
        u, sb = ub(g, sb, pb)
        pb = optax.apply_updates(pb, u)
    for k in params:
        np.testing.assert_allclose(np.asarray(pa[k]), np.asarray(pb[k]), rtol=0, atol=2e-6)
    assert float(np.mean(np.asarray(sa[0].mu["w"].codes) != np.asarray(sb.mu["w"].codes))) <= 1e-3


def test_fused_needs_params(rng):
    tx = adamw8bit(1e-3, fused=True, interpret=True)
    p = {"w": jnp.ones((64, 64))}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))


def test_inplace_step_matches_optax_path(rng):
    """adamw8bit_inplace writes the same parameters and state as the optax transformation."""
    from lowbit_jax.optim import adamw8bit_inplace

    params = {"w": jnp.asarray(rng.standard_normal((40, 128)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((7,)), jnp.float32)}
    tx = adamw8bit(1e-2, fused=False)
    opt = adamw8bit_inplace(1e-2, interpret=True)
    pa, sa = params, tx.init(params)
    pb, sb = params, opt.init(params)
    step = jax.jit(opt.step, donate_argnums=(1, 2))
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u, sa = jax.jit(tx.update)(g, sa, pa)
        pa = optax.apply_updates(pa, u)
        pb, sb = step(g, sb, pb)
    for k in params:
        np.testing.assert_allclose(np.asarray(pa[k]), np.asarray(pb[k]), rtol=0, atol=2e-6)
    assert int(sb.count) == 3
    assert float(np.mean(np.asarray(sa[0].nu["w"].codes) != np.asarray(sb.nu["w"].codes))) <= 1e-3


@pytest.mark.parametrize("select", ["tree", "switch"])
def test_leaves_in_one_launch_match_reference(rng, monkeypatch, select):
    """Several leaves (ragged, bf16 and fp32, own weight decay each) in one launch, and the same
    leaves grouped by signature into launches of two: every leaf equals its own reference step."""
    from lowbit_jax.optim.fused import adam8bit_step_fused_leaves, adam8bit_step_grouped
    from pallas_kernels import optim_8bit

    monkeypatch.setattr(optim_8bit, "LEAF_SELECT", select)

    # three leaves of one signature (grouped: launches of two and one), two others alone
    shapes = [((37, 300), "float32"), ((16, 256), "bfloat16"), ((37, 300), "float32"), ((9, 700), "float32"),
              ((37, 300), "float32")]
    ps = [jnp.asarray(rng.standard_normal(s), d) for s, d in shapes]
    gs = [jnp.asarray(rng.standard_normal(s), d) for s, d in shapes]
    mqs = [_state(rng, s, True) for s, _ in shapes]
    vqs = [_state(rng, s, False) for s, _ in shapes]
    hypers = [adam_hyper(0.9, 0.999, 1e-8, 1e-2, wd, 3) for wd in (1e-2, 0.0, 0.5, 1e-2, 0.0)]
    refs = [adam8bit_step_reference(h, p, g, m, v) for h, p, g, m, v in zip(hypers, ps, gs, mqs, vqs)]
    one = jax.jit(lambda *a: adam8bit_step_fused_leaves(*a, interpret=True))(jnp.stack(hypers), ps, gs, mqs, vqs)
    pairs = jax.jit(lambda *a: adam8bit_step_grouped(*a, interpret=True, leaves_per_launch=2))(
        hypers, ps, gs, mqs, vqs)
    assert len(one) == len(pairs) == len(shapes)
    for (s, dtype), ref, a, b in zip(shapes, refs, one, pairs):
        atol = 1e-6 if dtype == "float32" else 1e-2
        for got in (a, b):
            assert got[0].shape == s and got[0].dtype == jnp.dtype(dtype)
            np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32),
                                       rtol=0, atol=atol)
            for q, rq in ((got[1], ref[1]), (got[2], ref[2])):
                np.testing.assert_allclose(np.asarray(q.absmax), np.asarray(rq.absmax), rtol=1e-6)
                assert float(np.mean(np.asarray(q.codes) != np.asarray(rq.codes))) <= 1e-3
        np.testing.assert_array_equal(np.asarray(a[1].codes), np.asarray(b[1].codes))


def test_fused_step_groups_leaves_of_nested_params(rng, monkeypatch):
    """The optax transformation sends its 8-bit leaves through grouped launches; tuples inside
    the parameter tree stay containers (not mistaken for per-leaf results)."""
    from lowbit_jax.optim import fused

    monkeypatch.setattr(fused, "LEAVES_PER_LAUNCH", 2)
    params = {"layers": tuple(jnp.asarray(rng.standard_normal((20 + i, 256)), jnp.float32) for i in range(3)),
              "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}
    txa = adamw8bit(1e-2, fused=False)
    txb = adamw8bit(1e-2, fused=True, interpret=True)
    pa, pb, sa, sb = params, params, txa.init(params), txb.init(params)
    launches = str(jax.make_jaxpr(txb.update)(params, sb, params)).count("pallas_call[")
    assert launches == 3  # three 8-bit leaves of three shapes (one launch a shape); the bias: fp32
    same = {"layers": tuple(jnp.asarray(rng.standard_normal((24, 256)), jnp.float32) for _ in range(3))}
    launches = str(jax.make_jaxpr(txb.update)(same, txb.init(same), same)).count("pallas_call[")
    assert launches == 2  # three leaves of one shape, two a launch
    for _ in range(2):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        u, sa = jax.jit(txa.update)(g, sa, pa)
        pa = optax.apply_updates(pa, u)
        u, sb = jax.jit(txb.update)(g, sb, pb)
        pb = optax.apply_updates(pb, u)
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)


def test_fused_step_on_a_mesh_updates_shards_in_place(rng):
    """``shardings=``: leaves split along their leading axis in whole blocks run the kernel per
    shard inside shard_map (no gather), the others the gathered launch; both equal the
    single-device step exactly, and the state keeps ``state_shardings``' layout."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (scripts/test.sh forces 8 host devices)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from lowbit_jax import sharding as shd
    from lowbit_jax.optim import adamw8bit_inplace

    mesh = Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "model"))
    specs = {"rows": P("data"), "rows8": P(("data", "model")), "cols": P(None, "model"), "rep": P()}
    shapes = {"rows": (64, 512), "rows8": (128, 256), "cols": (48, 256), "rep": (40, 128)}
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    shardings = {k: NamedSharding(mesh, specs[k]) for k in params}
    opt_sh = adamw8bit_inplace(1e-2, interpret=True, shardings=shardings)
    opt = adamw8bit_inplace(1e-2, interpret=True)
    p_sh = jax.device_put(params, shardings)
    s_sh = jax.jit(opt_sh.init, out_shardings=shd.state_shardings(jax.eval_shape(opt_sh.init, params), shardings))(p_sh)
    pa, sa = params, opt.init(params)
    for i in range(2):
        g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        pa, sa = jax.jit(opt.step)(g, sa, pa)
        p_sh, s_sh = jax.jit(opt_sh.step)(jax.device_put(g, shardings), s_sh, p_sh)
    jaxpr = str(jax.make_jaxpr(opt_sh.step)(g, s_sh, p_sh))
    assert jaxpr.count("shard_map") == 2  # the two leading-axis splits ("data"; "data"+"model")
    for k in params:
        np.testing.assert_array_equal(np.asarray(p_sh[k]), np.asarray(pa[k]))
        for mom_sh, mom in ((s_sh.mu[k], sa.mu[k]), (s_sh.nu[k], sa.nu[k])):
            np.testing.assert_array_equal(np.asarray(mom_sh.codes), np.asarray(mom.codes))
            np.testing.assert_array_equal(np.asarray(mom_sh.absmax), np.asarray(mom.absmax))
    assert p_sh["rows"].sharding.is_equivalent_to(shardings["rows"], 2)
    bad = adamw8bit_inplace(1e-2, interpret=True, shardings=[shardings["rows"]])
    with pytest.raises(ValueError, match="shardings"):
        jax.jit(bad.step)(g, s_sh, p_sh)
    assert s_sh.mu["rows8"].absmax.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "model"))), 1)
