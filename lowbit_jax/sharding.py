"""Quantized weights on a device mesh: partition rules, placement, and per-shard matmuls.

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

Which weight splits how is decided by *rules*: ``(regex, "out" | "in" | None)`` pairs searched
in a leaf's path (``jax.tree_util.keystr``, e.g. ``"['layers']['q_proj']['kernel']"``), first
match wins, like qwix's rules over module paths. The same rules drive placement of a loaded or
restored tree (:func:`shard_tree`, :func:`tree_shardings`), the model's per-shard matmuls
(:class:`TensorParallel`) and the optimizer state (:func:`state_shardings`), so the three can
never disagree. Trees may be stacked (a leading layer axis for ``lax.scan``): every spec gets
one unsplit leading axis per stacking level.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowbit_jax import _compat, quant
from lowbit_jax.ops import LayerKernel, matmul_4bit, quantized_linear
from lowbit_jax.ops._grad import zero_cotangent
from lowbit_jax.optim._state import leading_split
# ops chooses the kernels; the per-shard backward reuses its choice and its fused backward
# (no shard of W is ever expanded in HBM), so it calls these two helpers rather than re-deciding.
from lowbit_jax.ops.matmul_4bit import _grad_x as _matmul_4bit_grad_x, _resolve as _resolve_4bit

__all__ = [
    "LLAMA_TP_RULES",
    "TensorParallel",
    "expand_double_quant",
    "partition_specs",
    "place_packed",
    "prepare_for_sharding",
    "put",
    "shard_tree",
    "sharded_matmul_4bit",
    "split_of",
    "state_shardings",
    "tree_shardings",
]

_AXES = (None, "out", "in")

# Megatron-style tensor parallelism for a Llama-family decoder: the projections into attention
# heads and the MLP's hidden width split by output (each device owns whole heads / hidden
# units, no communication), the projections back to the residual split by input (one psum).
LLAMA_TP_RULES = ((r"\['(q|k|v|gate|up)_proj'\]", "out"), (r"\['(o|down)_proj'\]", "in"))

Rules = Sequence[tuple[str, Optional[str]]]


def _check_rules(rules) -> tuple:
    try:
        out = tuple((str(pattern), axis) for pattern, axis in rules)
    except (TypeError, ValueError):
        raise ValueError(f"rules must be a sequence of (regex, 'out' | 'in' | None) pairs, got {rules!r}") from None
    for pattern, axis in out:
        if axis not in _AXES:
            raise ValueError(f"rules: axis for {pattern!r} must be one of {_AXES}, got {axis!r}")
        re.compile(pattern)
    return out


def split_of(path: str, rules: Rules) -> Optional[str]:
    """The split ("out", "in" or None) the first rule matching ``path`` asks for."""
    return next((axis for pattern, axis in rules if re.search(pattern, path)), None)


def _check_mesh_axis(mesh: Mesh, mesh_axis: str, name: str = "mesh_axis") -> int:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if mesh_axis not in mesh.axis_names:
        raise ValueError(f"{name} {mesh_axis!r} is not an axis of the mesh (axes: {mesh.axis_names})")
    return mesh.shape[mesh_axis]


# --------------------------------------------------------------------------------------------
# Layouts and partition specs of one (possibly stacked) weight
# --------------------------------------------------------------------------------------------


def _lead(q: quant.Packed4bit) -> int:
    """How many stacking axes (e.g. the layer axis of a scanned model) lead ``q``'s arrays."""
    return q.packed.ndim - (2 if q.layout == "rows" else 1)


def _per_layer(fn, q: quant.Packed4bit):
    """``fn`` applied to every stacked weight of ``q`` (``fn`` itself sees an unstacked one)."""
    for _ in range(_lead(q)):
        fn = jax.vmap(fn)
    return fn(q)


def expand_double_quant(q: quant.Packed4bit) -> quant.Packed4bit:
    """The same weight with float32 absmax instead of double-quantized absmax (codes unchanged)."""
    if not q.double_quant:
        return q
    return _per_layer(lambda w: w.replace(absmax=quant.absmax_4bit(w), nested_absmax=None, offset=None), q)


def _nested_aligned(q: quant.Packed4bit, shards: int) -> bool:
    nblocks = q.num_blocks
    return nblocks % shards == 0 and (nblocks // shards) % q.nested_blocksize == 0


def check_split(shape, blocksize: int, axis: str, shards: int) -> None:
    """Raise a ValueError unless a ``[out, in]`` weight quantized in ``blocksize`` blocks can be
    split ``shards`` ways along ``axis`` in whole blocks."""
    out_f, in_f = shape
    if axis == "out":
        if out_f % shards:
            raise ValueError(f"out-features ({out_f}) must be divisible by the mesh axis size ({shards})")
        if (out_f // shards) * in_f % blocksize:
            raise ValueError(
                f"an output shard ({out_f // shards} x {in_f}) must hold whole quantization blocks of {blocksize}")
    elif in_f % (shards * blocksize):
        raise ValueError(
            f"in-features ({in_f}) must be a multiple of mesh axis size x blocksize ({shards} x {blocksize})"
        )


def keeps_double_quant(q: quant.Packed4bit, axis: Optional[str], shards: int) -> bool:
    """Whether a split keeps ``q``'s double quantization (whole nested blocks on every shard)."""
    if not q.double_quant:
        return False
    return axis is None or (axis == "out" and _nested_aligned(q, shards))


def prepare_for_sharding(q: quant.Packed4bit, axis: Optional[str], shards: int) -> quant.Packed4bit:
    """Bring a (possibly stacked) 4-bit weight into a layout that can be split ``shards`` ways
    along ``axis``: flat for "out", rows (double quant expanded) for "in"."""
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {_AXES}, got {axis!r}")
    if axis is None:
        return q
    if len(q.shape) != 2:
        raise ValueError(f"only 2-D weights [out, in] can be split, got shape {q.shape}")
    check_split(q.shape, q.blocksize, axis, shards)
    if axis == "out":
        if not keeps_double_quant(q, axis, shards):
            q = expand_double_quant(q)
        return q if q.layout == "bnb" else _per_layer(quant.to_flat, q)
    q = expand_double_quant(q)
    return q if q.layout == "rows" else _per_layer(quant.to_rows, q)


def _spec(lead: int, *dims) -> P:
    return P(*((None,) * lead + dims))


def partition_specs(x, axis: Optional[str], mesh_axis: str, role: str = "kernel"):
    """PartitionSpecs (same pytree structure as ``x``) that split ``x`` along ``axis``.

    ``x`` is a Packed4bit prepared by :func:`prepare_for_sharding`, a RowwiseInt8, or a plain
    array whose ``role`` says what it is in a linear layer: "kernel" (Flax ``[in, out]``),
    "bias" ``[out]``, "lora_A" ``[in, r]``, "lora_B" ``[r, out]``; leading axes beyond those
    (stacked layers) stay unsplit. ``axis`` names the *weight's* dimension: "out" or "in".
    """
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {_AXES}, got {axis!r}")
    if isinstance(x, quant.Packed4bit):
        lead = _lead(x)
        if axis is None:
            return jax.tree.map(lambda _: P(), x)
        if axis == "out":
            if x.layout != "bnb":
                raise ValueError("an out-split 4-bit weight must use the flat layout (prepare_for_sharding)")
            nested = _spec(lead, mesh_axis) if x.double_quant else None
            return x.replace(packed=_spec(lead, mesh_axis), absmax=_spec(lead, mesh_axis), nested_absmax=nested,
                             offset=P() if x.double_quant else None)
        if x.layout != "rows" or x.double_quant:
            raise ValueError("an in-split 4-bit weight must use the rows layout without double quant")
        return x.replace(packed=_spec(lead, None, mesh_axis), absmax=_spec(lead, None, mesh_axis))
    if isinstance(x, quant.RowwiseInt8):
        lead = x.codes.ndim - 2
        if axis is None:
            return x.replace(codes=P(), row_absmax=P())
        if axis == "out":
            return x.replace(codes=_spec(lead, mesh_axis, None), row_absmax=_spec(lead, mesh_axis))
        return x.replace(codes=_spec(lead, None, mesh_axis), row_absmax=P())
    if isinstance(x, quant.QuantizedTensor):
        if axis is not None:
            raise ValueError(f"a {type(x).__name__} cannot be split; only replicated (axis None)")
        return jax.tree.map(lambda _: P(), x)
    if axis is None:
        return P()
    ndim = np.ndim(x)
    # Which of the trailing dims is the weight's in / out dimension, by role.
    dims = {"kernel": ("in", "out"), "lora_A": ("in", None), "lora_B": (None, "out"), "bias": ("out",)}
    if role not in dims:
        raise ValueError(f"role must be one of {tuple(dims)}, got {role!r}")
    trailing = dims[role]
    if ndim < len(trailing):
        raise ValueError(f"a {role} needs at least {len(trailing)} dimensions, got shape {np.shape(x)}")
    return _spec(ndim - len(trailing), *(mesh_axis if d == axis else None for d in trailing))


def _role(path) -> str:
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    return name if name in ("bias", "lora_A", "lora_B") else "kernel"


def _is_q(x) -> bool:
    return isinstance(x, quant.QuantizedTensor)


def _leaf_specs(path, leaf, rules: Rules, shards: int, mesh_axis: str):
    """The PartitionSpec tree the rules give the leaf at ``path`` (arrays or ShapeDtypeStructs),
    which must already be in the layout its split needs (``prepare_for_sharding``)."""
    name = jax.tree_util.keystr(path)
    axis = split_of(name, rules)
    role = _role(path)
    if isinstance(leaf, quant.Packed4bit):
        if axis is not None:
            check_split(leaf.shape, leaf.blocksize, axis, shards)
            if leaf.double_quant and not keeps_double_quant(leaf, axis, shards):
                raise ValueError(f"{name}: double-quantized absmax cannot be split {shards} ways along {axis!r} "
                                 "(nested blocks of 256 straddle shards); place it with shard_tree instead")
    elif isinstance(leaf, quant.QuantizedTensor):
        pass
    elif role == "kernel" and np.ndim(leaf) < 2:
        axis = None  # norms, scalars: replicated
    elif axis is not None and role == "kernel":
        dim = -1 if axis == "out" else -2
        if np.shape(leaf)[dim] % shards:
            raise ValueError(f"{name}: dimension {np.shape(leaf)[dim]} ({axis}) must be "
                             f"divisible by the mesh axis size ({shards})")
    try:
        return partition_specs(leaf, axis, mesh_axis, role)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def tree_shardings(tree, mesh: Mesh, rules: Rules, mesh_axis: str = "tp"):
    """NamedShardings (same structure as ``tree``) that the rules give a tree *already in* its
    sharded layout (placed by :func:`shard_tree`, or restored from one): for ``jit``'s
    ``out_shardings`` or for restoring a checkpoint onto a mesh. Leaves may be arrays or
    ``jax.ShapeDtypeStruct``.
    """
    rules = _check_rules(rules)
    shards = _check_mesh_axis(mesh, mesh_axis)

    def one(path, leaf):
        specs = _leaf_specs(path, leaf, rules, shards, mesh_axis)
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_q)


def _host_slice(host, index):
    """One shard's data (its own function so tests can watch what each device is sent)."""
    part = np.asarray(host[index])
    return part if part.flags.c_contiguous else np.ascontiguousarray(part)  # (keeps 0-d arrays 0-d)


def put(x, sharding_: NamedSharding) -> jax.Array:
    """``x`` onto ``sharding_``. A host array (numpy, memmap) goes slice by slice: every device --
    under ``jax.distributed``, every process for its own devices -- receives only its own part,
    so no device sees the whole array unless the sharding replicates it. A jax.Array is resharded.
    """
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding_)
    host = x if hasattr(x, "dtype") and hasattr(x, "shape") else np.asarray(x)
    return jax.make_array_from_callback(tuple(host.shape), sharding_, lambda index: _host_slice(host, index),
                                        dtype=host.dtype)


def _in_layout(q: quant.Packed4bit, axis: Optional[str], shards: int) -> bool:
    """Whether ``q`` is already in the layout a split along ``axis`` needs (prepare is a no-op)."""
    if axis is None:
        return True
    if axis == "out":
        return q.layout == "bnb" and (not q.double_quant or keeps_double_quant(q, axis, shards))
    return q.layout == "rows" and not q.double_quant


def _staging_specs(q: quant.Packed4bit, mesh_axis: str, shards: int):
    """Where a 4-bit weight waits for its re-layout: the codes split in contiguous chunks (as
    stored), the absmax arrays (1/32 of the codes' bytes, or less) replicated."""
    lead, packed = _lead(q), q.packed.shape
    if q.layout == "rows":
        spec = _spec(lead, mesh_axis, None) if packed[-2] % shards == 0 else P()
    else:
        spec = _spec(lead, mesh_axis) if packed[-1] % shards == 0 else P()
    return jax.tree.map(lambda _: P(), q).replace(packed=spec)


def _relayout(q: quant.Packed4bit, axis: str, mesh: Mesh, mesh_axis: str) -> quant.Packed4bit:
    """``prepare_for_sharding`` as one jitted program whose ``out_shardings`` are the split's: the
    re-layout (double-quant expansion, rows view) happens on the mesh, shard by shard."""
    shards = mesh.shape[mesh_axis]

    def fn(w):
        return prepare_for_sharding(w, axis, shards)

    specs = partition_specs(jax.eval_shape(fn, q), axis, mesh_axis)
    out = jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs, is_leaf=lambda x: isinstance(x, P))
    return jax.jit(fn, out_shardings=out)(q)


def place_packed(q: quant.Packed4bit, axis: Optional[str], mesh: Mesh, mesh_axis: str = "tp") -> quant.Packed4bit:
    """A 4-bit weight (host or device arrays, any layout, stacked or not) onto ``mesh``, split
    along ``axis``. When its layout must change first, the codes are sent split as stored and
    the change runs on the mesh (:func:`_relayout`), so no device is sent the whole weight."""
    shards = _check_mesh_axis(mesh, mesh_axis)
    if _in_layout(q, axis, shards):
        if axis is not None and len(q.shape) == 2:
            check_split(q.shape, q.blocksize, axis, shards)
        specs = partition_specs(q, axis, mesh_axis)
        return jax.tree.map(lambda a, sp: put(a, NamedSharding(mesh, sp)), q, specs)
    if len(q.shape) != 2:
        raise ValueError(f"only 2-D weights [out, in] can be split, got shape {q.shape}")
    check_split(q.shape, q.blocksize, axis, shards)
    staged = jax.tree.map(lambda a, sp: put(a, NamedSharding(mesh, sp)), q, _staging_specs(q, mesh_axis, shards))
    return _relayout(staged, axis, mesh, mesh_axis)


def shard_tree(tree, mesh: Mesh, rules: Rules, mesh_axis: str = "tp"):
    """Place every leaf of ``tree`` on ``mesh``: the first rule whose regex matches a leaf's path
    decides the split ("out", "in" or None = replicate); unmatched leaves are replicated.

    Quantized weights are re-laid-out when the split needs it (see module docstring), on the
    mesh (:func:`place_packed`). Host (numpy) leaves are sent slice by slice (:func:`put`).
    Plain leaves are split by their role, read from the last path key: ``kernel`` (``[in,
    out]``), ``bias``, ``lora_A``, ``lora_B``; 1-D leaves named otherwise (norms) replicate.
    """
    rules = _check_rules(rules)
    shards = _check_mesh_axis(mesh, mesh_axis)

    def place(path, leaf):
        if isinstance(leaf, quant.Packed4bit):
            try:
                return place_packed(leaf, split_of(jax.tree_util.keystr(path), rules), mesh, mesh_axis)
            except ValueError as e:
                raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None
        specs = _leaf_specs(path, leaf, rules, shards, mesh_axis)
        if isinstance(leaf, quant.QuantizedTensor):
            return jax.tree.map(lambda a, s: put(a, NamedSharding(mesh, s)), leaf, specs)
        return put(leaf, NamedSharding(mesh, specs))

    return jax.tree_util.tree_map_with_path(place, tree, is_leaf=_is_q)


# --------------------------------------------------------------------------------------------
# Optimizer states shard like their parameters
# --------------------------------------------------------------------------------------------


def _moment_shardings(moment, param_sharding: NamedSharding):
    """A Blockwise8bit moment's codes follow the parameter (same shape); its per-256 absmax
    follows when the parameter splits only its leading axis in whole blocks, else replicates
    (absmax is 1/64 of the codes' bytes)."""
    mesh = param_sharding.mesh
    rep = NamedSharding(mesh, P())
    absmax = rep
    axis = None if moment.nested else leading_split(moment.shape, moment.blocksize, param_sharding)
    if axis is not None:
        absmax = NamedSharding(mesh, P(axis))
    return moment.replace(**{name: (param_sharding if name == "codes" else absmax if name == "absmax" else rep)
                             for name in moment._leaves if getattr(moment, name) is not None})


def state_shardings(opt_state, param_shardings):
    """NamedShardings for an optax state (from ``tx.init(params)``) in which every
    parameter-shaped part -- 8-bit moments (``Blockwise8bit``) or fp32 ones -- shards like its
    parameter (ZeRO-style: a device stores the states of the parameter shards it owns); counts
    and other scalars replicate. ``param_shardings`` is the parameters' tree of NamedShardings
    (e.g. ``jax.tree.map(lambda x: x.sharding, params)``). Use it as ``out_shardings`` of the
    init and of the training step, so states never drift to another layout.
    """
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    flat_sh, param_def = jax.tree.flatten(param_shardings, is_leaf=is_sh)
    if not flat_sh or not all(isinstance(s, NamedSharding) for s in flat_sh):
        raise ValueError("param_shardings must be a non-empty tree of NamedShardings (one per parameter)")
    mesh = flat_sh[0].mesh
    rep = NamedSharding(mesh, P())
    is_moment = lambda x: isinstance(x, quant.QuantizedTensor)  # noqa: E731

    def per_param(node):
        def one(moment, sh):
            if isinstance(moment, quant.Blockwise8bit):
                return _moment_shardings(moment, sh)
            if isinstance(moment, quant.QuantizedTensor):
                return jax.tree.map(lambda _: rep, moment)
            return sh if np.ndim(moment) >= len(sh.spec) and np.ndim(moment) > 0 else rep

        leaves = jax.tree.leaves(node, is_leaf=is_moment)
        return jax.tree.unflatten(param_def, [one(m, s) for m, s in zip(leaves, flat_sh)])

    def walk(node):
        if node is not None and jax.tree.structure(node, is_leaf=is_moment) == param_def:
            return per_param(node)
        if isinstance(node, quant.QuantizedTensor):
            return jax.tree.map(lambda _: rep, node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, tuple) and hasattr(type(node), "_fields"):
            return type(node)(*[walk(v) for v in node])
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return jax.tree.map(lambda _: rep, node)

    return walk(opt_state)


# --------------------------------------------------------------------------------------------
# Per-shard matmuls
# --------------------------------------------------------------------------------------------


def _local(q: quant.Packed4bit, axis: str, shards: int) -> quant.Packed4bit:
    out_f, in_f = q.shape
    shape = (out_f // shards, in_f) if axis == "out" else (out_f, in_f // shards)
    return q.replace(shape=shape)


def sharded_matmul_4bit(x, q: quant.Packed4bit, mesh: Mesh, axis: str, mesh_axis: str = "tp", bias=None,
                        batch_axis: Optional[str] = None, impl: str = "auto", layer=None):
    """``x @ W.T`` with W split over ``mesh_axis``, each device running ``ops.matmul_4bit`` on its
    shard (so the GPU kernels run per shard).

    axis="out": x replicated over ``mesh_axis``, output split along its last dimension (no
                communication forward; the backward sums the per-shard input gradients).
    axis="in":  x split along its last dimension, partial products summed with ``psum`` (fp32).
    batch_axis: a mesh axis that splits x's leading dimension (data parallelism), or None.
    impl: as ``ops.matmul_4bit``'s, for every shard ("pallas_interpret" tests the kernels here).
    layer: ``q`` is stacked over layers (a model's scanned tree) and each shard multiplies with
    its part of layer ``layer`` in place (``ops.matmul_4bit(layer=)``); when the weight first
    needs a layout change for the split, the layer is sliced out instead (the change would
    otherwise run over every layer).
    The gradient reaches x and the bias, never W (frozen base weights, as in QLoRA); it runs
    ``ops``' fused backward per shard too.
    """
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
    shards = _check_mesh_axis(mesh, mesh_axis)
    if batch_axis is not None:
        _check_mesh_axis(mesh, batch_axis, "batch_axis")
        if x.ndim < 2:
            raise ValueError(f"batch_axis needs x with a leading batch dimension, got shape {x.shape}")
    prepared = prepare_for_sharding(q, axis, shards)
    if layer is not None and prepared is not q:  # a layout change: slice the layer out first
        q, layer = quant.layer_slice(q, layer), None
        prepared = prepare_for_sharding(q, axis, shards)
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
    q = prepared
    impl = _resolve_4bit(impl, _local(q, axis, shards))
    return _sharded_matmul(mesh, axis, mesh_axis, x.ndim, batch_axis, impl, layer is not None)(x, q, bias, layer)


@lru_cache(maxsize=None)
def _sharded_matmul(mesh: Mesh, axis: str, mesh_axis: str, ndim: int, batch_axis: Optional[str], impl: str,
                    stacked: bool = False):
    shards = mesh.shape[mesh_axis]
    lead = (batch_axis,) + (None,) * (ndim - 2) if ndim >= 2 else ()
    split_last, whole = P(*lead, mesh_axis), P(*lead, None)
    layer_spec = P() if stacked else None  # the layer index, replicated

    def q_specs(q):
        return partition_specs(q, axis, mesh_axis)

    def forward(x, q, bias, layer):
        def body(x_local, q_local, b_local, layer):
            q_local = _local(q_local, axis, shards)
            if axis == "out":
                return matmul_4bit(x_local, q_local, b_local, impl=impl, layer=layer)
            # The kernel runs in x's dtype (bf16 on the fast path); the partial sums add in fp32.
            partial = matmul_4bit(x_local, q_local, impl=impl, layer=layer).astype(jnp.float32)
            total = jax.lax.psum(partial, mesh_axis)
            if b_local is not None:
                total = total + b_local.astype(jnp.float32)
            return total.astype(x_local.dtype)

        x_spec, out_spec = (whole, split_last) if axis == "out" else (split_last, whole)
        b_spec = None if bias is None else (P(mesh_axis) if axis == "out" else P())
        # check=False: the varying-axes checker cannot type a pallas_call (the GPU kernels).
        fn = _compat.shard_map(body, mesh=mesh, in_specs=(x_spec, q_specs(q), b_spec, layer_spec), out_specs=out_spec,
                               check=False)
        return fn(x, q, bias, layer)

    def grad_x(g, q, x_dtype, layer):
        def body(g_local, q_local, layer):
            q_local = _local(q_local, axis, shards)
            if layer is not None:
                q_local = quant.layer_slice(q_local, layer)
            if axis == "in":
                return _matmul_4bit_grad_x(g_local, q_local, x_dtype, impl)
            # Each shard's out-features contribute a partial gradient of all of x: sum them in fp32.
            gx = _matmul_4bit_grad_x(g_local, q_local, jnp.float32, impl)
            return jax.lax.psum(gx, mesh_axis).astype(x_dtype)

        g_spec, out_spec = (split_last, whole) if axis == "out" else (whole, split_last)
        fn = _compat.shard_map(body, mesh=mesh, in_specs=(g_spec, q_specs(q), layer_spec), out_specs=out_spec,
                               check=False)
        return fn(g, q, layer)

    @jax.custom_vjp
    def f(x, q, bias, layer):
        return forward(x, q, bias, layer)

    def fwd(x, q, bias, layer):
        return forward(x, q, bias, layer), (q, bias, jnp.zeros((0,), x.dtype), layer)

    def bwd(res, g):
        q, bias, proto, layer = res
        gb = None
        if bias is not None:
            gb = jnp.sum(g.astype(jnp.float32).reshape(-1, g.shape[-1]), axis=0).astype(bias.dtype)
        return grad_x(g, q, proto.dtype, layer), zero_cotangent(q), gb, None

    f.defvjp(fwd, bwd)
    return f


# --------------------------------------------------------------------------------------------
# A model's plan: which mesh, which rules, which axes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """How a model runs on a mesh: weights split by ``rules`` over mesh axis ``axis``, the batch
    over ``batch_axis`` (data parallel; None = replicated). Hashable, so a jitted model takes it
    as a static argument; the model asks :meth:`linear` for every projection.
    """

    mesh: Mesh
    rules: tuple = LLAMA_TP_RULES
    axis: str = "tp"
    batch_axis: Optional[str] = None
    impl: str = "auto"  # ops.matmul_4bit's kernel choice, per shard

    def __post_init__(self):
        object.__setattr__(self, "rules", _check_rules(self.rules))
        _check_mesh_axis(self.mesh, self.axis, "axis")
        if self.batch_axis is not None:
            _check_mesh_axis(self.mesh, self.batch_axis, "batch_axis")
            if self.batch_axis == self.axis:
                raise ValueError(f"batch_axis and axis must be different mesh axes, both are {self.axis!r}")

    @property
    def shards(self) -> int:
        return self.mesh.shape[self.axis]

    def split(self, path: str) -> Optional[str]:
        return split_of(path, self.rules)

    def place(self, tree):
        """``tree`` on the mesh by the rules (see :func:`shard_tree`)."""
        return shard_tree(tree, self.mesh, self.rules, self.axis)

    def shardings(self, tree):
        """The NamedShardings of a tree already in its sharded layout (see :func:`tree_shardings`)."""
        return tree_shardings(tree, self.mesh, self.rules, self.axis)

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """For token/activation arrays: leading (batch) axis over ``batch_axis``, rest whole."""
        return NamedSharding(self.mesh, P(self.batch_axis, *((None,) * (ndim - 1))))

    def cache_sharding(self) -> NamedSharding:
        """A Llama KV cache ``[layers, batch, seq, kv_heads, head_dim]``: batch over the data axis,
        KV heads over the tensor axis (each device keeps the heads its q/k/v shards produce)."""
        return NamedSharding(self.mesh, P(None, self.batch_axis, None, self.axis, None))

    def linear(self, x, kernel, bias, path: str, *, compute_dtype=None, int8_threshold: float = 6.0):
        """``quantized_linear`` for the layer at ``path``: a split 4-bit kernel runs per shard
        (:func:`sharded_matmul_4bit`); anything else is left to XLA's partitioner (dense
        kernels partition well; a replicated quantized kernel runs whole on every device).
        """
        split = self.split(path)
        layer = None
        if isinstance(kernel, LayerKernel) and isinstance(kernel.stacked, quant.Packed4bit):
            kernel, layer = kernel.stacked, kernel.layer  # one layer of a stacked kernel, read in place
        if split is not None and isinstance(kernel, quant.Packed4bit):
            x = jnp.asarray(x)
            if compute_dtype is not None:
                x = x.astype(compute_dtype)
            return sharded_matmul_4bit(x, kernel, self.mesh, split, self.axis, bias, self.batch_axis, self.impl,
                                       layer=layer)
        if layer is not None:
            kernel = LayerKernel(kernel, layer)
        return quantized_linear(x, kernel, bias, int8_threshold=int8_threshold, compute_dtype=compute_dtype)
