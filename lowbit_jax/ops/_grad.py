"""Cotangent helpers shared by the quantized matmuls' custom VJPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def zero_cotangent(tree):
    """A zero cotangent for a frozen pytree: float0 for integer leaves, zeros for float leaves."""

    def zero(leaf):
        dt = jnp.dtype(leaf.dtype)
        if jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.complexfloating):
            return jnp.zeros(leaf.shape, dt)
        return np.zeros(leaf.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)
