"""AdamW 8-bit as one fused step per leaf: the Pallas kernel on 8-bit leaves, jnp on the rest.

The optax chain in ``transforms`` reads like optax but makes XLA walk the parameters several
times (dequantize, update, absmax, requantize are separate passes). Here every 8-bit leaf is
updated by ``pallas_kernels.optim_8bit`` in one pass, with bitsandbytes' in-place formula
``p <- p (1 - lr wd) - lr / c1 * m / (sqrt(v) / c2 + eps)``; the optax update returned is
``p_new - p``. ``adam8bit_step_reference`` is the same formula in plain jnp over the
quantization reference (``lowbit_jax.quant``): the kernel's test oracle.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lowbit_jax import _compat
from lowbit_jax.optim import _state
from lowbit_jax.optim._state import STATE_BLOCKSIZE
from lowbit_jax.optim.transforms import (
    ScaleByAdam8bitState,
    _check,
    _check_min_size,
    _count_inc,
    _f32,
    _move,
    _moments,
    _offload_spaces,
    _one_minus,
    _split,
)
from lowbit_jax.quant import Blockwise8bit
from pallas_kernels import optim_8bit as kernel


def adam_hyper(b1, b2, eps, lr, weight_decay, count) -> jax.Array:
    """The kernel's scalar vector (``optim_8bit.HYPER_FIELDS``) for step ``count`` (1-based)."""
    step = _f32(count)
    c1 = jnp.float32(1.0) - _f32(b1) ** step
    c2 = jnp.sqrt(jnp.float32(1.0) - _f32(b2) ** step)
    lr = _f32(lr)
    return jnp.stack([
        _f32(b1), _one_minus(b1), _f32(b2), _one_minus(b2), _f32(eps),
        jnp.float32(1.0) - lr * _f32(weight_decay), -lr / c1, c2,
    ])


def adam8bit_step_reference(hyper, p, g, mq: Blockwise8bit, vq: Blockwise8bit):
    """bitsandbytes' 8-bit blockwise Adam(W) step on one leaf in plain jnp: (p, m, v)."""
    b1, omb1, b2, omb2, eps, decay, step_size, c2 = (hyper[i] for i in range(8))
    g32 = g.astype(jnp.float32)
    m = _state.load(mq) * b1 + g32 * omb1
    v = _state.load(vq) * b2 + (g32 * g32) * omb2
    denom = jnp.sqrt(v) / c2 + eps
    p_new = p.astype(jnp.float32) * decay + step_size * (m / denom)
    return p_new.astype(p.dtype), _state.store(m, mq, True), _state.store(v, vq, False)


def _blocks(x, nblocks: int, fill=0):
    flat = x.reshape(-1)
    pad = nblocks * STATE_BLOCKSIZE - flat.shape[0]
    if pad:
        flat = jnp.pad(flat, (0, pad), constant_values=fill)
    return flat.reshape(nblocks, STATE_BLOCKSIZE)


def _unblocks(x, shape, n: int):
    return x.reshape(-1)[:n].reshape(shape)


# 8-bit leaves of one signature updated by one kernel launch: each launch ends in a partial wave
# (H100, 268M parameters, 40 steps a call: 16 leaves in one launch 1.615 ms, one launch a leaf
# 1.667; 64 leaves of 2048x2048 1.677 vs 1.902; RESULTS.md). Each leaf is a branch of the
# kernel, so its build time grows with the count (~11 s for 16 leaves): groups of 8.
LEAVES_PER_LAUNCH = 8


def _kernel_tables(kernel_options):
    """(table1, table2, kernel_options with the rounding's compile-time pieces)."""
    quantizer = kernel_options.get("quantizer", kernel.QUANTIZER)
    if quantizer == "logtable":
        (table1, params1), (table2, params2) = _state.state_log_table(True), _state.state_log_table(False)
        return table1, table2, dict(kernel_options, pieces=(params1, params2), quantizer=quantizer)
    if quantizer in ("segments", "segtable"):
        (pieces1, table1), (pieces2, table2) = _state.state_segments(True), _state.state_segments(False)
        kernel_options = dict(kernel_options, pieces=(pieces1, pieces2), quantizer=quantizer)
        if quantizer == "segtable":
            table1, table2 = kernel.segment_table(pieces1, table1), kernel.segment_table(pieces2, table2)
        return table1, table2, kernel_options
    return _state.state_lut(True), _state.state_lut(False), kernel_options


def adam8bit_step_fused_leaves(hypers, ps, gs, mqs, vqs, *, interpret: bool = False, **kernel_options):
    """The kernel's step on several 8-bit leaves in one launch: a list of (p, m, v), each equal
    to :func:`adam8bit_step_reference` of its leaf. ``hypers`` [L, 8] (one row a leaf).

    ``kernel_options`` (quantizer, rows, num_warps) go to ``optim_8bit.adam8bit_leaves``.
    """
    table1, table2, kernel_options = _kernel_tables(kernel_options)
    code1, code2 = mqs[0].code, vqs[0].code
    for j, (mq, vq) in enumerate(zip(mqs, vqs)):
        if mq.code.shape != code1.shape or vq.code.shape != code2.shape:
            raise ValueError(f"leaf {j}: every leaf's state must use the 256-entry dynamic maps")
    leaves, ns = [], []
    for p, g, mq, vq in zip(ps, gs, mqs, vqs):
        nblocks = mq.absmax.shape[0]
        leaves.append((_blocks(p, nblocks), _blocks(g, nblocks), _blocks(mq.codes, nblocks), mq.absmax,
                       _blocks(vq.codes, nblocks), vq.absmax))
        ns.append(mq.size)
    outs = kernel.adam8bit_leaves(jnp.asarray(hypers, jnp.float32), leaves, code1, code2, jnp.asarray(table1),
                                  jnp.asarray(table2), ns=tuple(ns), interpret=interpret, **kernel_options)
    result = []
    for (p_new, c1, a1, c2, a2), p, mq, vq, n in zip(outs, ps, mqs, vqs, ns):
        shape = tuple(p.shape)
        result.append((
            _unblocks(p_new, shape, n),
            mq.replace(codes=_unblocks(c1, shape, n), absmax=a1),
            vq.replace(codes=_unblocks(c2, shape, n), absmax=a2),
        ))
    return result


def adam8bit_step_fused(hyper, p, g, mq: Blockwise8bit, vq: Blockwise8bit, *, interpret: bool = False,
                        **kernel_options):
    """The kernel's step on one leaf: (p, m, v), equal to :func:`adam8bit_step_reference`."""
    return adam8bit_step_fused_leaves(jnp.reshape(hyper, (1, -1)), [p], [g], [mq], [vq], interpret=interpret,
                                      **kernel_options)[0]


def _by_group(keys, run):
    """``run(key, indices)`` once for each group of equal ``keys`` (first-seen order), its
    results put back in input order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = [None] * len(keys)
    for key, idx in groups.items():
        for i, r in zip(idx, run(key, idx)):
            out[i] = r
    return out


def _take(seq, idx):
    return [seq[i] for i in idx]


def adam8bit_step_grouped(hypers, ps, gs, mqs, vqs, *, interpret: bool = False,
                          leaves_per_launch: int | None = None, **kernel_options):
    """:func:`adam8bit_step_fused_leaves` over any number of leaves, in launches of up to
    ``LEAVES_PER_LAUNCH`` leaves of one signature (shape and dtypes), in the given order.

    A launch compiles one branch a leaf, so its build time grows with the leaves in it (H100:
    ~11 s for 16, ~0.5 s for one); launches of equal signature share one compiled kernel, so
    grouping by signature builds one kernel a distinct layer shape, not one per position."""
    size = leaves_per_launch or LEAVES_PER_LAUNCH

    def run(_, idx):
        res = []
        for j in range(0, len(idx), size):
            part = idx[j:j + size]
            res += adam8bit_step_fused_leaves(jnp.stack(_take(hypers, part)), _take(ps, part), _take(gs, part),
                                              _take(mqs, part), _take(vqs, part), interpret=interpret,
                                              **kernel_options)
        return res

    keys = [(tuple(p.shape), jnp.dtype(p.dtype).name, jnp.dtype(g.dtype).name) for p, g in zip(ps, gs)]
    return _by_group(keys, run)


def adam8bit_step_sharded(hypers, ps, gs, mqs, vqs, shardings, *, interpret: bool = False, **kernel_options):
    """:func:`adam8bit_step_grouped` for parameters on a device mesh, each device updating only
    its shards.

    A Pallas call has no partitioning rule: given sharded operands, XLA gathers them whole onto
    every device and runs the kernel there (a full fp32 copy of each leaf per device). Leaves
    that split only their leading axis in whole state blocks (``_state.leading_split``; the
    layout :func:`lowbit_jax.sharding.state_shardings` gives their states) run the kernel inside
    ``shard_map`` on their local shards instead: every shard holds whole blocks of the global
    layout, so the result is the global update. Other leaves (and ``shardings`` entries that
    are None) take the gathered path (for a replicated leaf that gathers nothing).
    ``shardings``: one NamedSharding (or None) a leaf.
    """

    def key(i):
        sh, mq = shardings[i], mqs[i]
        axis = None if sh is None or mq.nested else _state.leading_split(tuple(ps[i].shape), mq.blocksize, sh)
        return None if axis is None else (sh.mesh, axis)

    def run(mesh_axis, idx):
        args = (_take(hypers, idx), _take(ps, idx), _take(gs, idx), _take(mqs, idx), _take(vqs, idx))
        if mesh_axis is None:
            return adam8bit_step_grouped(*args, interpret=interpret, **kernel_options)
        return _per_shard(*mesh_axis, *args, interpret=interpret, **kernel_options)

    return _by_group([key(i) for i in range(len(ps))], run)


def _per_shard(mesh, axis, hypers, ps, gs, mqs, vqs, *, interpret, **kernel_options):
    """:func:`adam8bit_step_grouped` inside ``shard_map`` over leaves split along their leading
    axis by mesh ``axis``: the states' arrays go in and out bare (a moment's static shape is the
    global one outside, the shard's inside)."""

    def body(h, p_l, g_l, c1_l, a1_l, c2_l, a2_l, code1, code2):
        mql = [t.replace(codes=c, absmax=a, code=code1, shape=tuple(c.shape)) for t, c, a in zip(mqs, c1_l, a1_l)]
        vql = [t.replace(codes=c, absmax=a, code=code2, shape=tuple(c.shape)) for t, c, a in zip(vqs, c2_l, a2_l)]
        res = adam8bit_step_grouped(list(h), p_l, g_l, mql, vql, interpret=interpret, **kernel_options)
        return ([r[0] for r in res], [r[1].codes for r in res], [r[1].absmax for r in res],
                [r[2].codes for r in res], [r[2].absmax for r in res])

    lead, rep = [P(axis)] * len(ps), P()
    fn = _compat.shard_map(body, mesh=mesh, check=False, in_specs=(rep, *[lead] * 6, rep, rep),
                           out_specs=(lead,) * 5)
    new_p, c1, a1, c2, a2 = fn(jnp.stack(hypers), ps, gs, [m.codes for m in mqs], [m.absmax for m in mqs],
                               [v.codes for v in vqs], [v.absmax for v in vqs], mqs[0].code, vqs[0].code)
    return [(new_p[j], mqs[j].replace(codes=c1[j], absmax=a1[j]), vqs[j].replace(codes=c2[j], absmax=a2[j]))
            for j in range(len(ps))]


def _adam32_step(p, g, m, v, c1, c2, eps, lr, wd, b1, b2):
    """bitsandbytes' 32-bit Adam(W) kernel (leaves under ``min_8bit_size``)."""
    g32 = g.astype(jnp.float32)
    m = m * _f32(b1) + g32 * _one_minus(b1)
    v = v * _f32(b2) + (g32 * g32) * _one_minus(b2)
    p32 = p.astype(jnp.float32) * (jnp.float32(1.0) - lr * wd)
    update = m / (jnp.sqrt(v) + _f32(eps) * c2)
    p_new = p32 + (-lr * c2 / c1) * update
    return p_new.astype(p.dtype), m, v


class _Pending(NamedTuple):
    """An 8-bit leaf's operands, waiting for its group's kernel launch."""

    hyper: Any
    p: Any
    g: Any
    mq: Any
    vq: Any


class InplaceOptimizer(NamedTuple):
    """``init(params) -> state`` and ``step(grads, state, params) -> (params, state)``.

    The optax protocol returns updates that ``apply_updates`` adds in a second pass over the
    parameters (12 more bytes a parameter); ``step`` writes the new parameters from the kernel
    directly. Donate ``params`` and ``state`` to the jitted step so the writes are in place.
    """

    init: Callable
    step: Callable


def _fused_adamw(learning_rate, b1, b2, eps, weight_decay, mask, min_8bit_size, offload_state, interpret,
                 shardings=None):
    _check("b1", b1, 0.0, 1.0)
    _check("b2", b2, 0.0, 1.0)
    _check("weight_decay", weight_decay, 0.0, float("inf"))
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        mu = _moments(params, True, min_8bit_size)
        nu = _moments(params, False, min_8bit_size)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), _move(mu, host), _move(nu, host))

    def step_fn(grads, state, params):
        """(new params, new state): bitsandbytes' in-place step, the kernel on 8-bit leaves."""
        if params is None:
            raise ValueError("params must be given to the fused adamw8bit update (it updates them in one pass)")
        count = _count_inc(state.count)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = _f32(lr)
        if mask is None:
            decay_mask = jax.tree.map(lambda _: True, params)
        else:
            decay_mask = mask(params) if callable(mask) else mask
        step = _f32(count)
        c1 = jnp.float32(1.0) - _f32(b1) ** step
        c2 = jnp.sqrt(jnp.float32(1.0) - _f32(b2) ** step)
        hyper_on = adam_hyper(b1, b2, eps, lr, weight_decay, count)
        hyper_off = adam_hyper(b1, b2, eps, lr, 0.0, count)
        mu, nu = _move(state.mu, device), _move(state.nu, device)

        def leaf(g, p, decays, mq, vq):
            if isinstance(mq, Blockwise8bit):  # the kernel's leaves: gathered below, one launch a group
                return _Pending(jnp.where(jnp.asarray(decays), hyper_on, hyper_off), p, g, mq, vq)
            wd = jnp.where(jnp.asarray(decays), _f32(weight_decay), jnp.float32(0.0))
            return _adam32_step(p, g, mq, vq, c1, c2, eps, lr, wd, b1, b2)

        out = jax.tree.map(leaf, grads, params, decay_mask, mu, nu)
        treedef = jax.tree.structure(grads)
        out_leaves = treedef.flatten_up_to(out)
        pending = [i for i, o in enumerate(out_leaves) if isinstance(o, _Pending)]
        if pending:
            todo = [out_leaves[i] for i in pending]
            args = ([t.hyper for t in todo], [t.p for t in todo], [t.g for t in todo], [t.mq for t in todo],
                    [t.vq for t in todo])
            flat_sh = [None] * len(out_leaves)
            if shardings is not None:
                try:
                    flat_sh = treedef.flatten_up_to(shardings)
                except (ValueError, TypeError) as e:
                    raise ValueError("shardings must be a tree of NamedShardings with the parameters' structure "
                                     f"(e.g. jax.tree.map(lambda p: p.sharding, params)): {e}") from None
            done = adam8bit_step_sharded(*args, _take(flat_sh, pending), interpret=interpret)
            for i, r in zip(pending, done):
                out_leaves[i] = r
        out = jax.tree.unflatten(treedef, out_leaves)
        new_params, mu, nu = _split(grads, out, 3)
        return new_params, ScaleByAdam8bitState(count, _move(mu, host), _move(nu, host))

    return init_fn, step_fn


def fused_adamw_8bit(
    learning_rate: Union[float, Callable],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Optional[Union[Any, Callable]] = None,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
    interpret: bool = False,
    shardings: Any = None,
) -> optax.GradientTransformation:
    """AdamW 8-bit as an optax transformation whose large leaves update in one kernel pass.

    The update it returns is ``p_new - p`` (it needs ``params``). ``shardings``: the parameters'
    tree of NamedShardings when they live on a device mesh; leaves split along their leading axis
    in whole 256-value blocks then update shard by shard on their devices
    (:func:`adam8bit_step_sharded`) instead of being gathered whole onto each one.
    """
    init_fn, step_fn = _fused_adamw(learning_rate, b1, b2, eps, weight_decay, mask, min_8bit_size,
                                    offload_state, interpret, shardings)

    def update_fn(updates, state, params=None):
        new_params, state = step_fn(updates, state, params)
        # fp32: for bf16 params p + (p_new - p) is then exactly p_new after apply_updates' rounding
        u = jax.tree.map(lambda n, p: n.astype(jnp.float32) - p.astype(jnp.float32), new_params, params)
        return u, state

    return optax.GradientTransformation(init_fn, update_fn)


def adamw8bit_inplace(
    learning_rate: Union[float, Callable],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Optional[Union[Any, Callable]] = None,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
    interpret: bool = False,
    shardings: Any = None,
) -> InplaceOptimizer:
    """The fastest AdamW 8-bit step: ``step(grads, state, params) -> (params, state)``.

    Same numerics and state as ``adamw8bit(..., fused=True)``, without optax's separate
    ``apply_updates`` pass (benchmarks/RESULTS.md has both timings). ``shardings`` as in
    :func:`fused_adamw_8bit`.
    """
    return InplaceOptimizer(*_fused_adamw(learning_rate, b1, b2, eps, weight_decay, mask, min_8bit_size,
                                          offload_state, interpret, shardings))
