"""orbax save/restore of quantized trees and 8-bit optimizer states: bit-exact, shardable, atomic.

orbax stores arrays; the static half of our pytrees (a ``Packed4bit``'s shape, blocksize,
quant type, ...) lives in the treedef, which orbax can only rebuild from a target tree the
caller already has. Users restoring a quantized checkpoint usually have no such target (the
whole point is not to requantize), so next to the arrays we write ``lowbit_tree.json``: the
tree's structure with every container's static fields. Restore rebuilds the exact pytree from
it, no target needed; with a target (or shardings) the arrays land directly on the requested
devices. Leaves are stored as they are -- packed bytes, uint8 absmax codes, fp32 scales -- so
nothing is ever requantized and the round trip is bit-exact.

The JSON names classes; to stay safe on untrusted files, only our quantized containers and
NamedTuples defined in ``lowbit_jax`` or ``optax`` are rebuilt from it (looked up, never
imported on the file's say-so: the module must already be imported).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import jax
import numpy as np

from lowbit_jax.convert.atomic import atomic_dir
from lowbit_jax.convert.safety import CheckpointError
from lowbit_jax.quant import Blockwise8bit, Packed4bit, QuantizedTensor, RowwiseInt8

__all__ = ["save_tree", "restore_tree", "TREE_SPEC_FILE"]

PathLike = Union[str, os.PathLike]
TREE_SPEC_FILE = "lowbit_tree.json"
_ARRAYS_DIR = "arrays"
_FORMAT = "lowbit-jax-tree"
_QUANT_CLASSES = {c.__name__: c for c in (Packed4bit, Blockwise8bit, RowwiseInt8)}
_NAMEDTUPLE_MODULES = ("lowbit_jax", "optax")


class _Unencodable(Exception):
    pass


def _static_json(value):
    if isinstance(value, tuple):
        return {"tuple": [_static_json(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.integer):
        return int(value)
    raise _Unencodable(f"static field value {value!r}")


def _static_value(value):
    if isinstance(value, dict):
        return tuple(_static_value(v) for v in value["tuple"])
    return value


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _encode(node, leaves: list):
    """JSON structure of ``node`` in jax's flattening order, appending leaves to ``leaves``."""
    if node is None:
        return {"t": "none"}
    if isinstance(node, QuantizedTensor):
        cls = type(node)
        if _QUANT_CLASSES.get(cls.__name__) is not cls:
            raise _Unencodable(cls.__name__)
        static = {
            f.name: _static_json(getattr(node, f.name)) for f in dataclasses.fields(node) if f.name not in cls._leaves
        }
        return {"t": "quant", "cls": cls.__name__, "static": static,
                "c": {n: _encode(getattr(node, n), leaves) for n in cls._leaves}}  # fmt: skip
    if isinstance(node, dict):
        if not all(isinstance(k, str) for k in node):
            raise _Unencodable("dict with non-string keys")
        keys = sorted(node)
        return {"t": "dict", "k": keys, "c": [_encode(node[k], leaves) for k in keys]}
    if _is_namedtuple(node):
        cls = type(node)
        if not cls.__module__.split(".")[0] in _NAMEDTUPLE_MODULES:
            raise _Unencodable(cls.__qualname__)
        return {"t": "namedtuple", "m": cls.__module__, "q": cls.__qualname__,
                "c": [_encode(v, leaves) for v in node]}  # fmt: skip
    if isinstance(node, (list, tuple)):
        return {"t": type(node).__name__, "c": [_encode(v, leaves) for v in node]}
    if isinstance(node, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        leaves.append(node)
        return {"t": "leaf", "i": len(leaves) - 1}
    raise _Unencodable(type(node).__name__)


def _named_tuple_class(module: str, qualname: str):
    if module.split(".")[0] not in _NAMEDTUPLE_MODULES:
        raise CheckpointError(f"{TREE_SPEC_FILE}: refusing to rebuild {module}.{qualname} (not lowbit_jax/optax)")
    mod = sys.modules.get(module)
    if mod is None:
        # Importing is safe only for our own and optax's modules, which the check above ensures.
        import importlib

        mod = importlib.import_module(module)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        raise CheckpointError(f"{TREE_SPEC_FILE}: {module}.{qualname} is not a NamedTuple class")
    return obj


def _decode(spec, leaves: list):
    try:
        t = spec["t"]
        if t == "none":
            return None
        if t == "leaf":
            return leaves[spec["i"]]
        if t == "dict":
            return {k: _decode(c, leaves) for k, c in zip(spec["k"], spec["c"])}
        if t in ("list", "tuple"):
            seq = [_decode(c, leaves) for c in spec["c"]]
            return seq if t == "list" else tuple(seq)
        if t == "namedtuple":
            return _named_tuple_class(spec["m"], spec["q"])(*[_decode(c, leaves) for c in spec["c"]])
        if t == "quant":
            cls = _QUANT_CLASSES[spec["cls"]]
            kwargs = {k: _static_value(v) for k, v in spec["static"].items()}
            kwargs.update({n: _decode(c, leaves) for n, c in spec["c"].items()})
            return cls(**kwargs)
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{TREE_SPEC_FILE}: malformed tree spec ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"{TREE_SPEC_FILE}: unknown node type {t!r}")


def save_tree(path: PathLike, tree: Any, overwrite: bool = False) -> Path:
    """Save a pytree of (quantized) arrays to the directory ``path`` with orbax, atomically.

    Works for model trees, optax states (NamedTuples) and nested dicts. Trees with node types
    the spec cannot describe are still saved; restoring those needs ``target``.
    """
    leaves: list = []
    try:
        spec = _encode(tree, leaves)
    except _Unencodable:
        spec = None
    jax_paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    jax_leaves = [leaf for _, leaf in jax_paths_leaves]
    if spec is not None and (len(leaves) != len(jax_leaves) or any(a is not b for a, b in zip(leaves, jax_leaves))):
        spec = None  # our walk disagrees with jax's order: rely on a target at restore time
    items = {f"{i:06d}": (leaf if isinstance(leaf, (jax.Array, np.ndarray)) else np.asarray(leaf))
             for i, leaf in enumerate(jax_leaves)}  # fmt: skip
    meta = {
        "format": _FORMAT,
        "version": 1,
        "spec": spec,
        "leaves": [
            {"path": jax.tree_util.keystr(p), "shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)
             if not isinstance(v, jax.Array) else str(v.dtype)}
            for (p, _), v in zip(jax_paths_leaves, items.values())
        ],
    }  # fmt: skip
    import orbax.checkpoint as ocp

    with atomic_dir(path, overwrite=overwrite) as tmp:
        if items:
            ocp.PyTreeCheckpointer().save(tmp / _ARRAYS_DIR, args=ocp.args.PyTreeSave(items))
        # Written last: a directory with this file is a finished checkpoint.
        (tmp / TREE_SPEC_FILE).write_text(json.dumps(meta))
    return Path(path)


def _read_meta(path: Path) -> dict:
    f = path / TREE_SPEC_FILE
    if not f.is_file():
        raise CheckpointError(f"{path}: no {TREE_SPEC_FILE}; not a lowbit-jax checkpoint or an interrupted save")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{f}: not a {_FORMAT} spec")
    return meta


def restore_tree(path: PathLike, target: Any = None, sharding: Any = None) -> Any:
    """Restore a tree saved by :func:`save_tree`, bit-exact.

    target:   optional tree of the same structure (arrays or ``jax.ShapeDtypeStruct``); when its
              leaves carry shardings and ``sharding`` is None, leaves are restored onto them.
    sharding: a single ``jax.sharding.Sharding`` for every leaf, or a pytree of shardings with the
              tree's structure (quantized containers included, e.g. ``jax.tree.map(lambda x:
              x.sharding, target)``). Without either, leaves come back as numpy arrays.
    """
    path = Path(path)
    meta = _read_meta(path)
    infos = meta["leaves"]
    n = len(infos)
    if target is not None:
        t_paths_leaves = jax.tree_util.tree_flatten_with_path(target)[0]
        t_paths = [jax.tree_util.keystr(p) for p, _ in t_paths_leaves]
        saved = [i["path"] for i in infos]
        if t_paths != saved:
            diff = sorted(set(t_paths) ^ set(saved))[:5]
            raise ValueError(f"target's structure does not match the checkpoint's (first differing leaves: {diff})")
        for (p, leaf), info in zip(t_paths_leaves, infos):
            if hasattr(leaf, "shape") and tuple(leaf.shape) != tuple(info["shape"]):
                raise ValueError(f"target leaf {jax.tree_util.keystr(p)} has shape {tuple(leaf.shape)}, "
                                 f"checkpoint has {tuple(info['shape'])}")  # fmt: skip
    shardings: list = [None] * n
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = [sharding] * n
    elif sharding is not None:
        flat = jax.tree_util.tree_leaves(sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(flat) != n:
            raise ValueError(f"sharding tree has {len(flat)} leaves, the checkpoint {n}")
        shardings = flat
    elif target is not None:
        shardings = [getattr(leaf, "sharding", None) for leaf in jax.tree_util.tree_leaves(target)]

    import orbax.checkpoint as ocp

    keys = [f"{i:06d}" for i in range(n)]
    restore_args = {
        k: ocp.ArrayRestoreArgs(sharding=s) if isinstance(s, jax.sharding.Sharding) else ocp.RestoreArgs(restore_type=np.ndarray)
        for k, s in zip(keys, shardings)
    }  # fmt: skip
    items = {}
    if n:
        items = ocp.PyTreeCheckpointer().restore(path / _ARRAYS_DIR, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    leaves = [items[k] for k in keys]
    for leaf, info in zip(leaves, infos):
        if list(np.shape(leaf)) != info["shape"] or str(leaf.dtype) != info["dtype"]:
            raise CheckpointError(f"{path}: leaf {info['path']} restored as {leaf.dtype}{list(np.shape(leaf))}, "
                                  f"spec says {info['dtype']}{info['shape']}")  # fmt: skip
    if target is not None:
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
    if meta.get("spec") is None:
        raise ValueError(f"{path}: this tree's structure is not self-describing; pass target=")
    return _decode(meta["spec"], leaves)
