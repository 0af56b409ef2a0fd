"""8-bit optimizers as optax ``GradientTransformation``s, bitsandbytes' algorithm leaf by leaf.

Each ``scale_by_*_8bit`` is an ``init``/``update`` pair whose state is a NamedTuple of moment
trees; a moment of a leaf with ``min_8bit_size`` (4096) or more elements is a ``Blockwise8bit``
(codes shaped like the parameter + one fp32 absmax per 256 values), smaller ones stay fp32.
Every step dequantizes, updates in fp32 exactly as bitsandbytes' kernels do (its bias
correction and eps placement, which differ between the 8-bit and the 32-bit paths), and
requantizes with a fresh absmax. The public optimizers compose them with optax's own
``add_decayed_weights`` and ``scale_by_learning_rate``, so schedules, masks, ``MultiSteps``,
``inject_hyperparams`` and ``chain`` work as for any optax optimizer.

Updates come out in fp32 whatever the parameter dtype: ``optax.apply_updates`` then adds them
to bf16 parameters in fp32 and rounds once, as bitsandbytes' kernels write ``p``.

Size thresholds default to ``None`` (= 4096) so that ``optax.inject_hyperparams`` leaves them
static; pass ``static_args=("min_8bit_size",)`` to it when setting one explicitly.

``offload_state=True`` keeps the moments in pinned host memory between steps (bitsandbytes'
paged optimizers' use case): each step streams them to the device and back.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from lowbit_jax import _compat
from lowbit_jax.optim import _state
from lowbit_jax.optim._state import MIN_8BIT_SIZE
from lowbit_jax.quant import Blockwise8bit

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array
    mu: Any  # first moment: Blockwise8bit (signed map) or fp32 per leaf
    nu: Any  # second moment: Blockwise8bit (unsigned map) or fp32 per leaf


class ScaleByAdEMAMix8bitState(NamedTuple):
    count: jax.Array
    m1: Any  # fast EMA (b1), signed map
    m2: Any  # slow EMA (b3), signed map
    nu: Any  # second moment, unsigned map


class ScaleByLion8bitState(NamedTuple):
    count: jax.Array
    mu: Any


class Trace8bitState(NamedTuple):
    trace: Any


class ScaleByRms8bitState(NamedTuple):
    nu: Any


class ScaleByRss8bitState(NamedTuple):
    sum_of_squares: Any


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check(name: str, value, low: float, high: float, high_open: bool = True) -> None:
    if isinstance(value, (int, float)) and not (low <= value and (value < high if high_open else value <= high)):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def _check_min_size(min_8bit_size) -> int:
    """None means bitsandbytes' 4096 (a None default keeps it static under inject_hyperparams)."""
    if min_8bit_size is None:
        return MIN_8BIT_SIZE
    if not isinstance(min_8bit_size, int) or min_8bit_size < 1:
        raise ValueError(f"min_8bit_size must be a positive int, got {min_8bit_size!r}")
    return min_8bit_size


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _one_minus(b) -> jax.Array:
    """``1 - b`` as bitsandbytes gets it: in double for Python floats, then rounded to fp32."""
    if isinstance(b, (int, float)):
        return jnp.float32(1.0 - float(b))
    return jnp.float32(1.0) - _f32(b)


def _log(b) -> jax.Array:
    """log(b) from the double value for Python floats: log of 0.9999 rounded to fp32 first is
    off by 3e-4 relative, which AdEMAMix's beta3 schedule would carry into 1 - beta3_t."""
    if isinstance(b, (int, float)):
        return jnp.float32(math.log(float(b)))
    return jnp.log(_f32(b))


def _moments(params, signed: bool, min_8bit_size: int):
    return jax.tree.map(lambda p: _state.zeros_state(p, signed, min_8bit_size), params)


def _move(tree, space):
    if space is None:
        return tree
    return jax.tree.map(lambda x: jax.device_put(x, space), tree)


def _offload_spaces(offload_state: bool):
    """(host, device) memory spaces when offloading is asked for and possible, else (None, None)."""
    if not offload_state:
        return None, None
    host = _compat.host_memory_space()
    return (host, _compat.device_memory_space()) if host is not None else (None, None)


def _split(template, out, k: int):
    """The k-th element of the tuples that ``jax.tree.map`` left at ``template``'s leaves."""
    return [jax.tree.map(lambda _, o, i=i: o[i], template, out) for i in range(k)]


def _count_inc(count):
    return optax.safe_increment(count) if hasattr(optax, "safe_increment") else optax.safe_int32_increment(count)


# --------------------------------------------------------------------------------------------
# scale_by_* transformations
# --------------------------------------------------------------------------------------------


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` with 8-bit moments (bitsandbytes ``adam``).

    8-bit leaves: ``(m / (sqrt(v) / c2 + eps)) / c1``; fp32 leaves: bitsandbytes' 32-bit
    kernel's ``c2 / c1 * m / (sqrt(v) + eps * c2)`` with ``c1 = 1 - b1^t``, ``c2 = sqrt(1 - b2^t)``.
    """
    _check("b1", b1, 0.0, 1.0)
    _check("b2", b2, 0.0, 1.0)
    _check("eps", eps, 0.0, float("inf"))
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        mu = _moments(params, True, min_8bit_size)
        nu = _moments(params, False, min_8bit_size)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), _move(mu, host), _move(nu, host))

    def update_fn(updates, state, params=None):
        del params
        count = _count_inc(state.count)
        step = _f32(count)
        c1 = jnp.float32(1.0) - _f32(b1) ** step
        c2 = jnp.sqrt(jnp.float32(1.0) - _f32(b2) ** step)
        omb1, omb2 = _one_minus(b1), _one_minus(b2)
        mu, nu = _move(state.mu, device), _move(state.nu, device)

        def leaf(g, mq, vq):
            g32 = g.astype(jnp.float32)
            m = _state.load(mq) * _f32(b1) + g32 * omb1
            v = _state.load(vq) * _f32(b2) + (g32 * g32) * omb2
            if isinstance(mq, Blockwise8bit):
                u = (m / (jnp.sqrt(v) / c2 + _f32(eps))) / c1
            else:
                u = (m / (jnp.sqrt(v) + _f32(eps) * c2)) * (c2 / c1)
            return u, _state.store(m, mq, True), _state.store(v, vq, False)

        out = jax.tree.map(leaf, updates, mu, nu)
        u, mu, nu = _split(updates, out, 3)
        return u, ScaleByAdam8bitState(count, _move(mu, host), _move(nu, host))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_ademamix_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    t_alpha: Optional[int] = None,
    t_beta3: Optional[int] = None,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """AdEMAMix's direction ``(m1 / c1 + alpha_t m2) / (sqrt(nu) / c2 + eps)`` (bitsandbytes').

    ``m2`` is a slow EMA with ``beta3``; ``t_alpha``/``t_beta3`` ramp alpha linearly and beta3
    by bitsandbytes' log-space schedule over that many steps. bitsandbytes keeps m1 and m2 as
    one doubled buffer whose halves are quantized separately; here they are two moments.
    """
    for name, b in (("b1", b1), ("b2", b2), ("b3", b3)):
        _check(name, b, 0.0, 1.0)
    _check("alpha", alpha, 0.0, float("inf"))
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        return ScaleByAdEMAMix8bitState(
            jnp.zeros([], jnp.int32),
            _move(_moments(params, True, min_8bit_size), host),
            _move(_moments(params, True, min_8bit_size), host),
            _move(_moments(params, False, min_8bit_size), host),
        )

    def update_fn(updates, state, params=None):
        del params
        count = _count_inc(state.count)
        step = _f32(count)
        alpha_t = _f32(alpha)
        if t_alpha:
            alpha_t = jnp.minimum(step * _f32(alpha) / _f32(t_alpha), _f32(alpha))
        beta3_t, omb3 = _f32(b3), _one_minus(b3)
        if t_beta3:
            # bitsandbytes computes this in double; in fp32, 1 - beta3_t is taken as -expm1(log
            # beta3_t) so the slow EMA's small increment keeps its relative precision.
            ln_b1, ln_b3 = _log(b1), _log(b3)
            scale = step / _f32(t_beta3)
            log_b3t = (ln_b1 * ln_b3) / ((1 - scale) * ln_b3 + scale * ln_b1)
            capped = log_b3t >= ln_b3
            beta3_t = jnp.where(capped, _f32(b3), jnp.exp(log_b3t))
            omb3 = jnp.where(capped, _one_minus(b3), -jnp.expm1(log_b3t))
        c1 = jnp.float32(1.0) - _f32(b1) ** step
        c2 = jnp.sqrt(jnp.float32(1.0) - _f32(b2) ** step)
        m1s, m2s, nus = (_move(x, device) for x in (state.m1, state.m2, state.nu))

        def leaf(g, m1q, m2q, vq):
            g32 = g.astype(jnp.float32)
            m1 = _state.load(m1q) * _f32(b1) + g32 * _one_minus(b1)
            m2 = _state.load(m2q) * beta3_t + g32 * omb3
            v = _state.load(vq) * _f32(b2) + (g32 * g32) * _one_minus(b2)
            u = (m1 / c1 + alpha_t * m2) / (jnp.sqrt(v) / c2 + _f32(eps))
            return (u, _state.store(m1, m1q, True), _state.store(m2, m2q, True),
                    _state.store(v, vq, False))

        out = jax.tree.map(leaf, updates, m1s, m2s, nus)
        u, m1s, m2s, nus = _split(updates, out, 4)
        return u, ScaleByAdEMAMix8bitState(count, _move(m1s, host), _move(m2s, host), _move(nus, host))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lion_8bit(
    b1: float = 0.9, b2: float = 0.99, *, min_8bit_size: Optional[int] = None, offload_state: bool = False
) -> optax.GradientTransformation:
    """Lion's direction ``sign(b1 m + (1 - b1) g)``, then ``m <- b2 m + (1 - b2) g`` (8-bit m)."""
    _check("b1", b1, 0.0, 1.0)
    _check("b2", b2, 0.0, 1.0)
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        return ScaleByLion8bitState(jnp.zeros([], jnp.int32), _move(_moments(params, True, min_8bit_size), host))

    def update_fn(updates, state, params=None):
        del params
        mu = _move(state.mu, device)

        def leaf(g, mq):
            g32 = g.astype(jnp.float32)
            m = _state.load(mq)
            u = jnp.sign(m * _f32(b1) + g32 * _one_minus(b1))
            m = m * _f32(b2) + g32 * _one_minus(b2)
            return u, _state.store(m, mq, True)

        out = jax.tree.map(leaf, updates, mu)
        u, mu = _split(updates, out, 2)
        return u, ScaleByLion8bitState(_count_inc(state.count), _move(mu, host))

    return optax.GradientTransformation(init_fn, update_fn)


def trace_8bit(
    decay: float = 0.9, *, min_8bit_size: Optional[int] = None, offload_state: bool = False
) -> optax.GradientTransformation:
    """Heavy-ball momentum ``m <- decay m + g`` with an 8-bit trace (bitsandbytes ``momentum``)."""
    _check("decay", decay, 0.0, 1.0)
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        return Trace8bitState(_move(_moments(params, True, min_8bit_size), host))

    def update_fn(updates, state, params=None):
        del params

        def leaf(g, mq):
            m = _state.load(mq) * _f32(decay) + g.astype(jnp.float32)
            return m, _state.store(m, mq, True)

        out = jax.tree.map(leaf, updates, _move(state.trace, device))
        u, trace = _split(updates, out, 2)
        return u, Trace8bitState(_move(trace, host))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_rms_8bit(
    decay: float = 0.99, eps: float = 1e-8, *, min_8bit_size: Optional[int] = None, offload_state: bool = False
) -> optax.GradientTransformation:
    """RMSprop's ``g / (sqrt(v) + eps)``, ``v <- decay v + (1 - decay) g^2`` (bitsandbytes ``rmsprop``).

    bitsandbytes stores this one state under the signed map, as all its 1-state optimizers do.
    """
    _check("decay", decay, 0.0, 1.0)
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        return ScaleByRms8bitState(_move(_moments(params, True, min_8bit_size), host))

    def update_fn(updates, state, params=None):
        del params

        def leaf(g, vq):
            g32 = g.astype(jnp.float32)
            v = _state.load(vq) * _f32(decay) + (g32 * g32) * _one_minus(decay)
            return g32 / (jnp.sqrt(v) + _f32(eps)), _state.store(v, vq, True)

        out = jax.tree.map(leaf, updates, _move(state.nu, device))
        u, nu = _split(updates, out, 2)
        return u, ScaleByRms8bitState(_move(nu, host))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_rss_8bit(
    eps: float = 1e-10, *, min_8bit_size: Optional[int] = None, offload_state: bool = False
) -> optax.GradientTransformation:
    """Adagrad's ``g / (sqrt(sum g^2) + eps)`` with an 8-bit sum of squares (bitsandbytes ``adagrad``)."""
    min_8bit_size = _check_min_size(min_8bit_size)
    host, device = _offload_spaces(offload_state)

    def init_fn(params):
        return ScaleByRss8bitState(_move(_moments(params, True, min_8bit_size), host))

    def update_fn(updates, state, params=None):
        del params

        def leaf(g, vq):
            g32 = g.astype(jnp.float32)
            v = _state.load(vq) + g32 * g32
            return g32 / (jnp.sqrt(v) + _f32(eps)), _state.store(v, vq, True)

        out = jax.tree.map(leaf, updates, _move(state.sum_of_squares, device))
        u, ss = _split(updates, out, 2)
        return u, ScaleByRss8bitState(_move(ss, host))

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------


def _decayed(weight_decay, mask):
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return []
    return [optax.add_decayed_weights(weight_decay, mask)]


def adam8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """Adam with 8-bit states (``bitsandbytes.optim.Adam8bit``)."""
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, min_8bit_size=min_8bit_size, offload_state=offload_state),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Optional[Union[Any, Callable]] = None,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
    fused: Optional[bool] = None,
    interpret: bool = False,
    shardings: Any = None,
) -> optax.GradientTransformation:
    """AdamW with 8-bit states (``bitsandbytes.optim.AdamW8bit``): decoupled weight decay.

    By default the step is the jnp chain ``scale_by_adam_8bit -> add_decayed_weights ->
    scale_by_learning_rate``, which XLA fuses well and which runs the same on every backend.
    ``fused=True`` runs the Pallas kernel that updates each 256-value block in one pass
    (H100, 268M parameters, with optax's ``apply_updates``: 3.43 ms against the chain's 4.74;
    :func:`lowbit_jax.optim.adamw8bit_inplace`, which skips ``apply_updates``' extra pass over
    p: 1.62 ms). It stays opt-in because its state is one ``ScaleByAdam8bitState`` rather than
    the chain's tuple (a checkpoint of one does not restore into the other, so the default must
    not change with the backend) and its update needs ``params``. ``interpret=True`` runs the
    kernel in Pallas' interpreter (CPU tests). ``shardings`` (fused only): the parameters'
    NamedShardings, so that sharded leaves update shard by shard (``fused_adamw_8bit``).
    """
    if shardings is not None and not (fused or interpret):
        raise ValueError("shardings= is for the fused kernel (fused=True); the jnp chain is partitioned by XLA")
    _check("weight_decay", weight_decay, 0.0, float("inf"))
    if fused is None:
        fused = False
    if fused or interpret:
        from lowbit_jax.optim.fused import fused_adamw_8bit

        return fused_adamw_8bit(
            learning_rate, b1, b2, eps, weight_decay, mask,
            min_8bit_size=min_8bit_size, offload_state=offload_state, interpret=interpret, shardings=shardings,
        )
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, min_8bit_size=min_8bit_size, offload_state=offload_state),
        *_decayed(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def ademamix8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    t_alpha: Optional[int] = None,
    t_beta3: Optional[int] = None,
    mask: Optional[Union[Any, Callable]] = None,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """AdEMAMix with 8-bit states (``bitsandbytes.optim.AdEMAMix8bit``): decoupled weight decay."""
    _check("weight_decay", weight_decay, 0.0, float("inf"))
    return optax.chain(
        scale_by_ademamix_8bit(b1, b2, b3, alpha, eps, t_alpha, t_beta3,
                               min_8bit_size=min_8bit_size, offload_state=offload_state),
        *_decayed(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def lion8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Optional[Union[Any, Callable]] = None,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """Lion with an 8-bit momentum (``bitsandbytes.optim.Lion8bit``): decoupled weight decay."""
    _check("weight_decay", weight_decay, 0.0, float("inf"))
    return optax.chain(
        scale_by_lion_8bit(b1, b2, min_8bit_size=min_8bit_size, offload_state=offload_state),
        *_decayed(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sgd8bit(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """SGD with an 8-bit momentum buffer (``bitsandbytes.optim.SGD8bit``).

    Weight decay is added to the gradient before the momentum, as bitsandbytes does (L2, not
    decoupled). bitsandbytes has no 8-bit SGD without momentum, nor do we.
    """
    if not isinstance(momentum, (int, float)) or not 0.0 < momentum < 1.0:
        raise ValueError(f"momentum must be in (0, 1) for an 8-bit SGD (there is no state without it), got {momentum!r}")
    return optax.chain(
        *_decayed(weight_decay, None),
        trace_8bit(momentum, min_8bit_size=min_8bit_size, offload_state=offload_state),
        optax.scale_by_learning_rate(learning_rate),
    )


def rmsprop8bit(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """RMSprop with an 8-bit second moment (``bitsandbytes.optim.RMSprop8bit``, L2 weight decay)."""
    return optax.chain(
        *_decayed(weight_decay, None),
        scale_by_rms_8bit(decay, eps, min_8bit_size=min_8bit_size, offload_state=offload_state),
        optax.scale_by_learning_rate(learning_rate),
    )


def adagrad8bit(
    learning_rate: ScalarOrSchedule,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
    *,
    min_8bit_size: Optional[int] = None,
    offload_state: bool = False,
) -> optax.GradientTransformation:
    """Adagrad with an 8-bit sum of squares (``bitsandbytes.optim.Adagrad8bit``, L2 weight decay)."""
    return optax.chain(
        *_decayed(weight_decay, None),
        scale_by_rss_8bit(eps, min_8bit_size=min_8bit_size, offload_state=offload_state),
        optax.scale_by_learning_rate(learning_rate),
    )
