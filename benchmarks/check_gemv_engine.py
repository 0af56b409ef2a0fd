"""Which one-row 4-bit GEMV engine ``ops.matmul_4bit`` runs on this GPU, and why.

The tensor-core engine is used only after its self-check (``mma_engine_checked``) agrees with
the row-sum engine for the launch shape; a failed check warns and falls back silently in speed.
This prints every launch shape's verdict for the layer shapes of a Llama-3-8B decode (bf16 and
fp16 x), any warning raised, and the product's difference from the jnp reference.

Usage (GPU): PYTHONPATH=. python3 benchmarks/check_gemv_engine.py
"""

from __future__ import annotations

import warnings


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lowbit_jax import quant
    from lowbit_jax.ops import _matmul_4bit_kernels as kern
    from lowbit_jax.ops import matmul_4bit

    print("backend", jax.default_backend(), jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    failed = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n, k in ((14336, 4096), (4096, 4096), (1024, 4096), (4096, 14336)):
            w = jax.random.normal(jax.random.PRNGKey(n + k), (n, k), jnp.float32) * 0.02
            q = quant.quantize_4bit(w, 64, "nf4", compress_statistics=True)
            for dtype in (jnp.bfloat16, jnp.float16):
                x = jax.random.normal(jax.random.PRNGKey(7), (1, k), jnp.float32).astype(dtype)
                y = np.asarray(jax.jit(lambda x, q: matmul_4bit(x, q))(x, q), np.float32)
                ref = np.asarray(jax.jit(lambda x, q: matmul_4bit(x, q, impl="reference"))(x, q), np.float32)
                rel = float(np.abs(y - ref).max() / np.abs(ref).max())
                ok = rel < 2e-2
                failed |= not ok
                print(f"N={n} K={k} {jnp.dtype(dtype).name}: max rel diff vs reference {rel:.3g} "
                      f"{'ok' if ok else 'MISMATCH'}", flush=True)
    for key, ok in kern._MMA_CHECKS.items():
        print("self-check", key, "passed" if ok else "FAILED (row-sum engine used)", flush=True)
    for w in caught:
        print("warning:", w.category.__name__, str(w.message)[:400], flush=True)
    if jax.default_backend() == "gpu":
        failed |= not kern._MMA_CHECKS or not all(kern._MMA_CHECKS.values())
    else:
        print("not on a GPU: the jnp reference ran, no self-check", flush=True)
    print("engine check", "FAILED" if failed else "all ok", flush=True)


if __name__ == "__main__":
    main()
