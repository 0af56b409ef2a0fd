"""8-bit optimizers for optax, bitsandbytes' algorithms: states in 8 bits, updates in fp32.

``adamw8bit(1e-3)`` is a drop-in for ``optax.adamw(1e-3)``; its state is ~2 bytes a parameter
instead of 8. See ``transforms`` for the transformations and ``fused`` for the one-pass kernel.
"""

from lowbit_jax.optim._state import MIN_8BIT_SIZE, STATE_BLOCKSIZE, state_nbytes
from lowbit_jax.optim.fused import InplaceOptimizer, adamw8bit_inplace
from lowbit_jax.optim.transforms import (
    ScaleByAdam8bitState,
    ScaleByAdEMAMix8bitState,
    ScaleByLion8bitState,
    ScaleByRms8bitState,
    ScaleByRss8bitState,
    Trace8bitState,
    adagrad8bit,
    adam8bit,
    adamw8bit,
    ademamix8bit,
    lion8bit,
    rmsprop8bit,
    scale_by_adam_8bit,
    scale_by_ademamix_8bit,
    scale_by_lion_8bit,
    scale_by_rms_8bit,
    scale_by_rss_8bit,
    sgd8bit,
    trace_8bit,
)

__all__ = [
    "InplaceOptimizer",
    "adamw8bit_inplace",
    "MIN_8BIT_SIZE",
    "STATE_BLOCKSIZE",
    "ScaleByAdam8bitState",
    "ScaleByAdEMAMix8bitState",
    "ScaleByLion8bitState",
    "ScaleByRms8bitState",
    "ScaleByRss8bitState",
    "Trace8bitState",
    "adagrad8bit",
    "adam8bit",
    "adamw8bit",
    "ademamix8bit",
    "lion8bit",
    "rmsprop8bit",
    "scale_by_adam_8bit",
    "scale_by_ademamix_8bit",
    "scale_by_lion_8bit",
    "scale_by_rms_8bit",
    "scale_by_rss_8bit",
    "sgd8bit",
    "state_nbytes",
    "trace_8bit",
]
