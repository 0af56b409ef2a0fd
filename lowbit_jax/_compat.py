"""The one place that knows which JAX version is running.

lowbit-jax supports JAX 0.10.2 (CPU CI) and 0.11.x (the GPU image); every API difference
between them is gated here so the rest of the code reads the same on both.
"""

from __future__ import annotations

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def default_backend() -> str:
    """'cpu', 'gpu' or 'tpu' (jax.default_backend() with 'cuda'/'rocm' folded into 'gpu')."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def on_gpu() -> bool:
    return default_backend() == "gpu"
