"""Device time of a jitted JAX call, without the host's per-call dispatch and sync latency.

Timing one blocked call at a time (``t0; block_until_ready(f()); t1``) adds the dispatch and the
host-device round trip (~150-250 us for a small jit on an H100 box) to every sample: at 8 layers of
a 30 MB matmul that is most of the number. Here ``calls`` calls are queued back to back and the
clock is read once after the last one finishes, so the device never waits for the host as long
as one call's device work outlasts its dispatch; the result is the median over ``trials`` of the
mean per call.
"""

from __future__ import annotations

import time

import numpy as np


def device_time_s(f, *args, calls: int = 20, trials: int = 5) -> float:
    import jax

    jax.block_until_ready(f(*args))
    per_call = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / calls)
    return float(np.median(per_call))


def blocked_time_s(f, *args, reps: int = 20) -> float:
    """The older per-call method (dispatch included), kept to compare with anchors taken that way."""
    import jax

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))
