"""Quantized weights on a device mesh: partition specs, placement, and per-shard matmuls.

A quantized weight can be split two ways without touching its bytes:

* along the output dimension (tensor parallel, column-split): whole rows of codes, their
  absmax and -- when the shard boundaries fall on nested blocks of 256 absmax -- their nested
  absmax go to each device; the matmul needs no communication;
* along the input dimension (row-split) in whole quantization blocks, on the ``"rows"`` layout
  (``quant.to_rows``): each device multiplies its slice of x by its slice of W and the partial
  sums are reduced with ``psum``.

Double quantization packs 256 absmax per nested block across rows, so an input-dimension split
cannot carry it along; such weights are expanded to float32 absmax first (+0.375 bit/param on
that layer) -- the one place the layout costs memory, and said so here rather than hidden.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowbit_jax import _compat, quant
from lowbit_jax.ops import matmul_4bit
from lowbit_jax.ops._grad import zero_cotangent

__all__ = [
    "expand_double_quant",
    "partition_specs",
    "shard_tree",
    "sharded_matmul_4bit",
]

_AXES = (None, "out", "in")


def expand_double_quant(q: quant.Packed4bit) -> quant.Packed4bit:
    """The same weight with float32 absmax instead of double-quantized absmax (codes unchanged)."""
    if not q.double_quant:
        return q
    return q.replace(absmax=quant.absmax_4bit(q), nested_absmax=None, offset=None)


def _nested_aligned(q: quant.Packed4bit, shards: int) -> bool:
    nblocks = q.num_blocks
    return nblocks % shards == 0 and (nblocks // shards) % q.nested_blocksize == 0


def prepare_for_sharding(q: quant.Packed4bit, axis: Optional[str], shards: int) -> quant.Packed4bit:
    """Bring a 4-bit weight into a layout that can be split ``shards`` ways along ``axis``."""
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {_AXES}, got {axis!r}")
    if axis is None:
        return q
    out_f, in_f = q.shape
    if axis == "out":
        if out_f % shards:
            raise ValueError(f"out-features ({out_f}) must be divisible by the mesh axis size ({shards})")
        if (out_f // shards) * in_f % q.blocksize:
            raise ValueError("an output shard must hold whole quantization blocks")
        if q.double_quant and not _nested_aligned(q, shards):
            q = expand_double_quant(q)
        return quant.to_flat(q)
    if in_f % (shards * q.blocksize):
        raise ValueError(
            f"in-features ({in_f}) must be a multiple of mesh axis size x blocksize ({shards} x {q.blocksize})"
        )
    return quant.to_rows(expand_double_quant(q))


def partition_specs(x, axis: Optional[str], mesh_axis: str):
    """PartitionSpecs (same pytree structure as ``x``) that split ``x`` along ``axis``.

    ``x`` is a Packed4bit prepared by :func:`prepare_for_sharding`, a RowwiseInt8, or a plain
    Flax-layout kernel ``[in, out]``. ``axis`` names the *weight's* dimension: "out" or "in".
    """
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {_AXES}, got {axis!r}")
    if isinstance(x, quant.Packed4bit):
        if axis is None:
            return jax.tree.map(lambda _: P(), x)
        if axis == "out":
            if x.layout != "bnb":
                raise ValueError("an out-split 4-bit weight must use the flat layout (prepare_for_sharding)")
            nested = P(mesh_axis) if x.double_quant else None
            return x.replace(packed=P(mesh_axis), absmax=P(mesh_axis), nested_absmax=nested,
                             offset=P() if x.double_quant else None)
        if x.layout != "rows" or x.double_quant:
            raise ValueError("an in-split 4-bit weight must use the rows layout without double quant")
        return x.replace(packed=P(None, mesh_axis), absmax=P(None, mesh_axis))
    if isinstance(x, quant.RowwiseInt8):
        if axis is None:
            return x.replace(codes=P(), row_absmax=P())
        if axis == "out":
            return x.replace(codes=P(mesh_axis, None), row_absmax=P(mesh_axis))
        return x.replace(codes=P(None, mesh_axis), row_absmax=P())
    if axis is None:
        return P()
    # Plain Flax kernel [in, out].
    return P(None, mesh_axis) if axis == "out" else P(mesh_axis, None)


def shard_tree(tree, mesh: Mesh, rules: Sequence[tuple[str, Optional[str]]], mesh_axis: str = "tp"):
    """Place every leaf of ``tree`` on ``mesh``: the first rule whose regex matches a leaf's path
    decides the split ("out", "in" or None = replicate); unmatched leaves are replicated.

    Quantized weights are re-laid-out first when the split needs it (see module docstring).
    """
    shards = mesh.shape[mesh_axis]
    is_q = lambda v: isinstance(v, quant.QuantizedTensor)  # noqa: E731

    def place(path, leaf):
        name = jax.tree_util.keystr(path)
        axis = next((a for pattern, a in rules if re.search(pattern, name)), None)
        if isinstance(leaf, quant.Packed4bit):
            leaf = prepare_for_sharding(leaf, axis, shards)
        elif not isinstance(leaf, quant.QuantizedTensor) and getattr(leaf, "ndim", 0) != 2:
            axis = None  # biases, norms: replicated
        specs = partition_specs(leaf, axis, mesh_axis)
        if isinstance(leaf, quant.QuantizedTensor):
            return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), leaf, specs)
        return jax.device_put(leaf, NamedSharding(mesh, specs))

    return jax.tree_util.tree_map_with_path(place, tree, is_leaf=is_q)


def _local(q: quant.Packed4bit, axis: str, shards: int) -> quant.Packed4bit:
    out_f, in_f = q.shape
    shape = (out_f // shards, in_f) if axis == "out" else (out_f, in_f // shards)
    return q.replace(shape=shape)


def sharded_matmul_4bit(x, q: quant.Packed4bit, mesh: Mesh, axis: str, mesh_axis: str = "tp", bias=None):
    """``x @ W.T`` with W split over ``mesh_axis``, each device running ``ops.matmul_4bit`` on its
    shard (so the GPU kernels run per shard).

    axis="out": x replicated, output split along its last dimension (no communication forward;
                the backward sums the per-shard input gradients).
    axis="in":  x split along its last dimension, partial products summed with ``psum`` (fp32).
    The gradient reaches x and the bias, never W (frozen base weights, as in QLoRA).
    """
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
    shards = mesh.shape[mesh_axis]
    q = prepare_for_sharding(q, axis, shards)
    return _sharded_matmul(mesh, axis, mesh_axis, x.ndim)(x, q, bias)


@lru_cache(maxsize=None)
def _sharded_matmul(mesh: Mesh, axis: str, mesh_axis: str, ndim: int):
    shards = mesh.shape[mesh_axis]
    lead = (None,) * (ndim - 1)
    split_last, whole = P(*lead, mesh_axis), P(*lead, None)

    def q_specs(q):
        return partition_specs(q, axis, mesh_axis)

    def forward(x, q, bias):
        def body(x_local, q_local, b_local):
            q_local = _local(q_local, axis, shards)
            if axis == "out":
                return matmul_4bit(x_local, q_local, b_local)
            partial = matmul_4bit(x_local.astype(jnp.float32), q_local).astype(jnp.float32)
            total = jax.lax.psum(partial, mesh_axis)
            if b_local is not None:
                total = total + b_local.astype(jnp.float32)
            return total.astype(x_local.dtype)

        x_spec, out_spec = (whole, split_last) if axis == "out" else (split_last, whole)
        b_spec = None if bias is None else (P(mesh_axis) if axis == "out" else P())
        fn = _compat.shard_map(body, mesh=mesh, in_specs=(x_spec, q_specs(q), b_spec), out_specs=out_spec)
        return fn(x, q, bias)

    def grad_x(g, q, x_dtype):
        def body(g_local, q_local):
            q_local = _local(q_local, axis, shards)
            w = quant.dequantize_4bit(q_local, jnp.float32)  # one shard, never the whole weight
            gx = jnp.einsum("...n,nk->...k", g_local.astype(jnp.float32), w)
            if axis == "out":
                gx = jax.lax.psum(gx, mesh_axis)
            return gx.astype(x_dtype)

        g_spec, out_spec = (split_last, whole) if axis == "out" else (whole, split_last)
        fn = _compat.shard_map(body, mesh=mesh, in_specs=(g_spec, q_specs(q)), out_specs=out_spec, check=False)
        return fn(g, q)

    @jax.custom_vjp
    def f(x, q, bias):
        return forward(x, q, bias)

    def fwd(x, q, bias):
        return forward(x, q, bias), (q, bias, jnp.zeros((0,), x.dtype))

    def bwd(res, g):
        q, bias, proto = res
        gb = None
        if bias is not None:
            gb = jnp.sum(g.astype(jnp.float32).reshape(-1, g.shape[-1]), axis=0).astype(bias.dtype)
        return grad_x(g, q, proto.dtype), zero_cotangent(q), gb

    f.defvjp(fwd, bwd)
    return f
