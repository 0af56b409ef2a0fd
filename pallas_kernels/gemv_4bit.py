"""Fused 4-bit (NF4/FP4) GEMV for decode (M from 1 to ~16): split-K over the weight stream.

At M=1 the work is streaming the weight (0.5 B/element + absmax) through the decode; a grid
over N alone gives K=4096 / 2 bytes of serial work per program and too few bytes in flight.
Splitting K across a third grid axis multiplies the programs in flight; each writes an fp32
partial ``[splits, M, N]`` and the caller's fused XLA reduction adds them (plus bias) and casts.

Rows of x beyond a handful go through the tensor cores (``mode="dot"``, x padded to 16 rows);
for 1..4 rows an elementwise multiply-add into ``[BN, BH]`` fp32 accumulators with one
reduction at the end avoids the 16-row padding and the shared-memory round trip of a dot.
The body is ``gemm_4bit.forward_body``; only the launch shape differs.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.gemm_4bit import fused_forward

# launch defaults; ops.matmul_4bit passes measured ones on the GPU
BN, BH, SPLITS = 64, 128, 4
FMA_MAX_ROWS = 4


def gemv_4bit(xe, xo, packed, absmax, *, quant_type, blocksize, nested_absmax=None,
              nested_code=None, offset=None, nested_blocksize=256, bias=None, block_n=BN,
              block_h=BH, splits=SPLITS, mode=None, decode="select", num_warps=4, num_stages=3,
              interpret=False):
    """``x @ W.T`` for few rows, as fp32-accumulated, x-dtype output ``[M, N]``.

    ``xe``/``xo`` are x's even/odd columns ``[M, K/2]`` with M = 1, 2, 4 (``mode="fma"``) or a
    multiple of 16 (``mode="dot"``); ``packed`` ``[N, K/2]`` with N a multiple of ``block_n``
    and K/2 a multiple of ``splits * block_h``.
    """
    m = xe.shape[0]
    if mode is None:
        mode = "fma" if m <= FMA_MAX_ROWS else "dot"
    block_m = m if mode == "fma" else 16
    parts = fused_forward(
        xe, xo, packed, absmax, quant_type=quant_type, blocksize=blocksize,
        nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
        nested_blocksize=nested_blocksize, bias=bias if splits == 1 else None, block_m=block_m,
        block_n=block_n, block_h=block_h, splits=splits, mode=mode, decode=decode,
        out_dtype=jnp.float32, num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    y = parts if splits == 1 else jnp.sum(parts, axis=0)
    if bias is not None and splits != 1:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(xe.dtype)
