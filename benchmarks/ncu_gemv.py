"""Launch the one-row 4-bit GEMV (K=4096, N=14336, NF4 + double quant, bf16 x) a few times for
Nsight Compute: ``ncu -k regex:gemv_4bit python3 benchmarks/ncu_gemv.py [--config gemv.engine=mma]``."""

from __future__ import annotations

import argparse

try:
    from benchmarks._timing import apply_config
except ImportError:  # run as a script from benchmarks/
    from _timing import apply_config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--n", type=int, default=14336)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp

    from lowbit_jax import quant
    from lowbit_jax.ops import _matmul_4bit_kernels as kern
    from lowbit_jax.ops import matmul_4bit

    print("config", apply_config(kern.GPU_CONFIG, a.config), flush=True)
    w = jax.random.normal(jax.random.PRNGKey(0), (a.n, 4096), jnp.float32) * 0.02
    q = quant.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 4096), jnp.bfloat16)
    f = jax.jit(lambda x: matmul_4bit(x, q))
    for _ in range(3):
        jax.block_until_ready(f(x))


if __name__ == "__main__":
    main()
