"""Host tensors onto a mesh, quantized per shard: the placement behind ``load_pretrained(mesh=)``.

The point is memory: a sharded layer's full-precision weight must never sit on one device.
So nothing here calls ``device_put`` on a whole tensor. :func:`put_host` builds the global
array with ``jax.make_array_from_callback``: each addressable device receives only the host
slice of its own shard (under ``jax.distributed`` each process slices for its own devices
only). :func:`quantize_onto_mesh` then quantizes inside ``shard_map``: a device sees its
``[out/n, in]`` or ``[out, in/n]`` slice and nothing else. Shards hold whole quantization
blocks, so the per-shard codes and absmax *are* the slices of the whole tensor's -- bit for
bit what ``prepare_for_sharding(quantize_weight(w))`` gives. Double quantization needs one
global number, the mean of all absmax: the fp32 absmax (1/16 of a bf16 weight's bytes) is
all-gathered for it, never the weight.
"""

from __future__ import annotations

import pathlib
from functools import lru_cache
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowbit_jax import _compat, quant, sharding
from lowbit_jax.nn.config import QuantConfig, quantize_weight

__all__ = ["convert_leaf", "put_host", "quantize_onto_mesh", "quantize_sharded", "restore_onto_mesh", "split_spec",
           "stack_sharded"]


def put_host(host, sharding_: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding_`` from a host array (numpy, memmap): every
    addressable device is sent only its own slice (``sharding.put``)."""
    return sharding.put(np.asarray(host) if not hasattr(host, "shape") else host, sharding_)


def _tp_axis(mesh: Mesh, mesh_axis: Optional[str]) -> str:
    if mesh_axis is not None:
        sharding._check_mesh_axis(mesh, mesh_axis)
        return mesh_axis
    if "tp" in mesh.axis_names:
        return "tp"
    if len(mesh.axis_names) == 1:
        return mesh.axis_names[0]
    raise ValueError(f"mesh needs a 'tp' (tensor-parallel) axis, or a single axis; got axes {mesh.axis_names}")


def _double_quant_values(absmax):
    """The float32 absmax that double quantization leaves (quantize, then dequantize)."""
    offset = quant._bnb_mean(absmax)
    inner = quant.quantize_blockwise(absmax - offset, blocksize=quant.NESTED_BLOCKSIZE)
    return quant._nested_absmax_values(inner.codes, inner.absmax, offset, quant.NESTED_BLOCKSIZE)


@lru_cache(maxsize=None)
def _quantize_4bit_fn(mesh, mesh_axis, axis, shape, blocksize, quant_type, dq_mode):
    """dq_mode: "none"; "keep" (whole nested blocks per shard: nested codes split like absmax);
    "expand" (nested blocks straddle shards: store the fp32 values double quantization leaves,
    as ``prepare_for_sharding`` does for a double-quantized weight)."""
    out_f, _ = shape

    def body(w):
        q = quant.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        packed, absmax = q.packed, q.absmax
        if axis == "in":
            packed, absmax = packed.reshape(out_f, -1), absmax.reshape(out_f, -1)
        if dq_mode == "none":
            return packed, absmax
        # bitsandbytes' offset is the mean of *all* absmax: gather those (not the weight) for it.
        gathered = jax.lax.all_gather(absmax, mesh_axis, axis=absmax.ndim - 1, tiled=True)
        if dq_mode == "keep":
            offset = quant._bnb_mean(gathered)
            inner = quant.quantize_blockwise(absmax - offset, blocksize=quant.NESTED_BLOCKSIZE)
            return packed, inner.codes, inner.absmax, offset
        values = _double_quant_values(gathered.reshape(-1)).reshape(gathered.shape)
        width = absmax.shape[-1]
        start = jax.lax.axis_index(mesh_axis) * width
        return packed, jax.lax.dynamic_slice_in_dim(values, start, width, axis=values.ndim - 1)

    split = P(mesh_axis) if axis == "out" else P(None, mesh_axis)
    w_spec = P(mesh_axis, None) if axis == "out" else P(None, mesh_axis)
    out_specs = (split, split, split, P()) if dq_mode == "keep" else (split, split)
    return jax.jit(_compat.shard_map(body, mesh=mesh, in_specs=(w_spec,), out_specs=out_specs, check=False))


@lru_cache(maxsize=None)
def _quantize_int8_fn(mesh, mesh_axis, axis):
    def body(w):
        w = w.astype(jnp.float16)  # bitsandbytes' Int8Params quantizes the fp16 copy (quantize_weight)
        if axis == "out":
            q = quant.quantize_int8(w)
            return q.codes, q.row_absmax
        # Each row's scale is the absmax over *all* its columns: reduce it across shards, then
        # let it win the local max by appending it as one extra column (same codes, same bits).
        row_max = jax.lax.pmax(jnp.max(jnp.abs(w), axis=1), mesh_axis)
        codes, row_absmax, _ = quant.int8_vectorwise_quant(jnp.concatenate([w, row_max[:, None]], axis=1), 0.0)
        return codes[:, :-1], row_absmax

    if axis == "out":
        in_spec, out_specs = P(mesh_axis, None), (P(mesh_axis, None), P(mesh_axis))
    else:
        in_spec, out_specs = P(None, mesh_axis), (P(None, mesh_axis), P())
    return jax.jit(_compat.shard_map(body, mesh=mesh, in_specs=(in_spec,), out_specs=out_specs, check=False))


def _validate(shape, dtype, config: QuantConfig, axis, shards: int, name: str) -> None:
    if axis not in sharding._AXES:
        raise ValueError(f"axis must be one of {sharding._AXES}, got {axis!r}")
    if not config.enabled:
        raise ValueError("config must quantize (load_in_4bit or load_in_8bit)")
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D weight [out, in], got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {dtype}; quantize-on-load expects floating weights")
    if axis is None:
        return
    if config.load_in_8bit:
        if shape[0 if axis == "out" else 1] % shards:
            raise ValueError(f"{axis}-features of {shape} must be divisible by the mesh axis size ({shards})")
    else:
        sharding.check_split(shape, config.blocksize, axis, shards)


def split_spec(axis: Optional[str], mesh_axis: str) -> P:
    """The PartitionSpec of a full-precision ``[out, in]`` weight split along ``axis``."""
    return P() if axis is None else P(mesh_axis, None) if axis == "out" else P(None, mesh_axis)


def quantize_sharded(w: jax.Array, config: QuantConfig, mesh: Mesh, axis: Optional[str],
                     mesh_axis: Optional[str] = None):
    """Quantize a device ``[out, in]`` weight that is already split along ``axis`` (placed with
    ``split_spec(axis, mesh_axis)``: e.g. drawn by a jitted RNG with that ``out_shardings``),
    shard by shard, without gathering it. See :func:`quantize_onto_mesh`."""
    mesh_axis = _tp_axis(mesh, mesh_axis)
    shards = mesh.shape[mesh_axis]
    shape = tuple(w.shape)
    _validate(shape, jnp.dtype(w.dtype), config, axis, shards, "w")
    if axis is None:
        # Replicated: every device holds the whole layer anyway, so each quantizes its copy.
        return jax.jit(lambda w: quantize_weight(w, config), out_shardings=NamedSharding(mesh, P()))(w)
    w = jax.device_put(w, NamedSharding(mesh, split_spec(axis, mesh_axis)))  # a no-op when already split so
    if config.load_in_8bit:
        codes, row_absmax = _quantize_int8_fn(mesh, mesh_axis, axis)(w)
        return quant.RowwiseInt8(codes=codes, row_absmax=row_absmax, shape=shape, dtype="float16")
    n_blocks = -(-int(np.prod(shape)) // config.blocksize)
    keep_dq = config.double_quant and axis == "out" and n_blocks % shards == 0 \
        and (n_blocks // shards) % quant.NESTED_BLOCKSIZE == 0
    dq_mode = "keep" if keep_dq else "expand" if config.double_quant else "none"
    arrays = _quantize_4bit_fn(mesh, mesh_axis, axis, shape, config.blocksize, config.quant_type, dq_mode)(w)
    nested = offset = None
    if keep_dq:
        packed, absmax, nested, offset = arrays
    else:
        packed, absmax = arrays
    return quant.Packed4bit(packed=packed, absmax=absmax, nested_absmax=nested, offset=offset, shape=shape,
                            dtype=jnp.dtype(w.dtype).name, blocksize=config.blocksize, quant_type=config.quant_type,
                            layout="bnb" if axis == "out" else "rows")


def quantize_onto_mesh(host_w, config: QuantConfig, mesh: Mesh, axis: Optional[str], mesh_axis: Optional[str] = None):
    """Quantize a host ``[out, in]`` weight (PyTorch layout) as ``config`` says, straight onto
    ``mesh``: split along ``axis`` ("out", "in") over ``mesh_axis``, or replicated (None).

    Equals ``shard_tree``'s placement of ``quantize_weight(w, config)`` bit for bit, but each
    device only ever holds its own slice of ``w`` (see the module docstring). A 4-bit weight
    keeps double quantization where the split allows it (whole nested blocks per shard).
    """
    host_w = host_w if hasattr(host_w, "dtype") and hasattr(host_w, "shape") else np.asarray(host_w)
    mesh_axis = _tp_axis(mesh, mesh_axis)
    _validate(tuple(host_w.shape), jnp.dtype(host_w.dtype), config, axis, mesh.shape[mesh_axis], "host_w")
    w = put_host(host_w, NamedSharding(mesh, split_spec(axis, mesh_axis)))
    return quantize_sharded(w, config, mesh, axis, mesh_axis)


def convert_leaf(host, path: str, field: Optional[str], quantize: Optional[QuantConfig], compute_dtype,
                 plan: sharding.TensorParallel):
    """One checkpoint tensor (host, PyTorch layout) -> one leaf of the model tree at ``path``
    (``jax.tree_util.keystr`` form), placed by ``plan``'s rules: quantized per shard when
    ``quantize`` is a config, else a Flax ``[in, out]`` kernel (``field == "kernel"``) or a
    bias/norm vector, cast to ``compute_dtype`` on the devices, each holding only its slice."""
    axis = plan.split(path)
    if field == "kernel" and quantize is not None:
        return quantize_onto_mesh(host, quantize, plan.mesh, axis, plan.axis)
    if field == "kernel":
        host = np.asarray(host).T  # a view: each device's slice is cut from it, never copied whole
        role = "kernel"
    else:
        role = "bias" if field == "bias" else "kernel"
        axis = axis if field == "bias" else None
    spec = sharding.partition_specs(host, axis, plan.axis, role)
    for size, name in zip(np.shape(host), spec):
        if name is not None and size % plan.shards:
            raise ValueError(f"{path}: dimension {size} of shape {np.shape(host)} must be divisible by the "
                             f"mesh axis {plan.axis!r} ({plan.shards})")
    return put_host(host, NamedSharding(plan.mesh, spec)).astype(compute_dtype)


def _stack_arrays(*xs):
    return jnp.stack(xs)


@lru_cache(maxsize=None)
def _stacker(out: NamedSharding):
    return jax.jit(_stack_arrays, out_shardings=out)


def stack_sharded(items: list):
    """``jnp.stack`` leaf by leaf (e.g. per-layer weights into the scanned ``[L, ...]`` tree),
    keeping each leaf's NamedSharding with the new leading axis unsplit -- so stacking never
    gathers a shard anywhere."""

    def stack(*xs):
        sh = getattr(xs[0], "sharding", None)
        if isinstance(sh, NamedSharding):
            return _stacker(NamedSharding(sh.mesh, P(None, *sh.spec)))(*xs)
        return jnp.stack(xs)

    return jax.tree.map(stack, *items)


def restore_onto_mesh(path, mesh: Mesh, rules: sharding.Rules, mesh_axis: str = "tp"):
    """Restore a tree saved by ``convert.orbax_io.save_tree`` -- from any mesh, or from one device
    -- straight onto ``mesh`` by ``rules``: orbax reads for each device only its shard's bytes.

    The tree's structure and layouts come from the checkpoint's spec file, so no target tree
    is needed. A 4-bit weight saved in a layout the new split cannot use (e.g. a canonical,
    double-quantized weight that is to be split by input features) is read with its codes split
    as stored and re-laid-out on the mesh (``sharding.place_packed``): no device ever reads it whole.
    """
    from lowbit_jax.convert import orbax_io  # convert imports this module: import it late

    rules = sharding._check_rules(rules)
    shards = sharding._check_mesh_axis(mesh, mesh_axis)
    meta = orbax_io._read_meta(pathlib.Path(path))
    if meta.get("spec") is None:
        raise ValueError(f"{path}: this tree's structure is not self-describing; restore it with restore_tree(target=)")
    abstract = orbax_io._decode(meta["spec"], [jax.ShapeDtypeStruct(tuple(i["shape"]), jnp.dtype(i["dtype"]))
                                               for i in meta["leaves"]])

    def needs_relayout(path_, leaf) -> bool:
        axis = sharding.split_of(jax.tree_util.keystr(path_), rules)
        return isinstance(leaf, quant.Packed4bit) and not sharding._in_layout(leaf, axis, shards)

    def read_as(path_, leaf):
        if needs_relayout(path_, leaf):
            specs = sharding._staging_specs(leaf, mesh_axis, shards)
        else:
            specs = sharding._leaf_specs(path_, leaf, rules, shards, mesh_axis)
        return jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs, is_leaf=lambda x: isinstance(x, P))

    is_q = lambda x: isinstance(x, quant.QuantizedTensor)  # noqa: E731
    restored = orbax_io.restore_tree(path, sharding=jax.tree_util.tree_map_with_path(read_as, abstract, is_leaf=is_q))

    def finish(path_, leaf, like):
        if not needs_relayout(path_, like):
            return leaf
        return sharding._relayout(leaf, sharding.split_of(jax.tree_util.keystr(path_), rules), mesh, mesh_axis)

    return jax.tree_util.tree_map_with_path(finish, restored, abstract, is_leaf=is_q)
