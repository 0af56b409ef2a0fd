"""orbax round trips of quantized trees and 8-bit optimizer states: bit-exact, shardable, atomic."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import quant as Q
from lowbit_jax.convert.orbax_io import TREE_SPEC_FILE, restore_tree, save_tree
from lowbit_jax.convert.safety import CheckpointError


def _assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb  # same structure and the same static fields (shape, blocksize, quant_type, ...)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))  # bit-exact


def _tree(rng):
    w = rng.standard_normal((64, 96)).astype(np.float32)
    return {
        "layers": [
            {"q": Q.quantize_4bit(w, 64, "nf4", False), "bias": jnp.asarray(rng.standard_normal(64), jnp.bfloat16)},
            {"q": Q.quantize_4bit(jnp.asarray(w, jnp.bfloat16), 128, "fp4", True)},
        ],
        "int8": Q.quantize_int8(w),
        "blockwise": Q.quantize_blockwise(jnp.asarray(rng.standard_normal(5000), jnp.float32)),
        "nested": {"deeper": {"norm": np.asarray(rng.standard_normal(7), np.float32), "step": np.int32(3)}},
        "none": None,
        "tup": (np.float32(1.5), np.arange(4)),
    }


def test_round_trip_without_target_is_bit_exact(rng, tmp_path):
    tree = _tree(rng)
    save_tree(tmp_path / "ck", tree)
    back = restore_tree(tmp_path / "ck")
    _assert_same_tree(tree, back)
    assert isinstance(back["layers"][1]["q"], Q.Packed4bit) and back["layers"][1]["q"].double_quant
    assert back["layers"][1]["q"].quant_type == "fp4" and back["layers"][1]["q"].blocksize == 128
    # the restored containers work
    np.testing.assert_array_equal(np.asarray(Q.dequantize(back["int8"])), np.asarray(Q.dequantize(tree["int8"])))
    with pytest.raises(FileExistsError):
        save_tree(tmp_path / "ck", tree)
    save_tree(tmp_path / "ck", {"a": np.ones(2)}, overwrite=True)
    assert set(restore_tree(tmp_path / "ck")) == {"a"}


def test_optimizer_state_round_trip(rng, tmp_path):
    import optax

    from lowbit_jax.optim import adamw8bit

    params = {"w": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32), "b": jnp.zeros(64)}
    opt = adamw8bit(1e-3)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    _, state = opt.update(grads, state, params)
    save_tree(tmp_path / "opt", state)
    back = restore_tree(tmp_path / "opt")
    _assert_same_tree(state, back)
    assert any(isinstance(x, Q.Blockwise8bit) for x in jax.tree_util.tree_leaves(back, is_leaf=lambda x: isinstance(x, Q.QuantizedTensor)))
    # training continues identically from the restored state
    u1, _ = opt.update(grads, state, params)
    u2, _ = opt.update(grads, jax.tree.map(jnp.asarray, back), params)
    _assert_same_tree(u1, u2)
    del optax


def test_restore_onto_sharding(rng, tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("x",))
    n = len(devices)
    q = Q.quantize_4bit(rng.standard_normal((8 * n, 64)).astype(np.float32), 64, "nf4", True)
    tree = {"q": q, "codes": Q.quantize_int8(rng.standard_normal((8 * n, 32)).astype(np.float32))}
    save_tree(tmp_path / "s", tree)
    # a single sharding for every leaf
    rep = NamedSharding(mesh, P())
    back = restore_tree(tmp_path / "s", sharding=rep)
    _assert_same_tree(tree, back)
    assert all(x.sharding == rep for x in jax.tree_util.tree_leaves(back))
    # a per-leaf sharding tree: the packed bytes split over devices, the rest replicated
    row = NamedSharding(mesh, P("x"))
    shard_tree = jax.tree.map(lambda _: rep, tree)
    shard_tree = {"q": shard_tree["q"].replace(packed=row), "codes": shard_tree["codes"].replace(codes=row)}
    back = restore_tree(tmp_path / "s", target=tree, sharding=shard_tree)
    _assert_same_tree(tree, back)
    assert back["q"].packed.sharding == row and back["codes"].codes.sharding == row
    assert back["q"].absmax.sharding == rep
    # shardings carried by a target of ShapeDtypeStructs
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shard_tree)
    back = restore_tree(tmp_path / "s", target=target)
    assert back["codes"].codes.sharding == row
    _assert_same_tree(tree, back)


def test_target_mismatch_and_missing_spec(rng, tmp_path):
    tree = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.int8)}
    save_tree(tmp_path / "t", tree)
    with pytest.raises(ValueError, match="structure"):
        restore_tree(tmp_path / "t", target={"a": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        restore_tree(tmp_path / "t", target={"a": np.ones(4, np.float32), "b": np.zeros(2, np.int8)})
    (tmp_path / "t" / TREE_SPEC_FILE).unlink()
    with pytest.raises(CheckpointError, match="interrupted"):
        restore_tree(tmp_path / "t")


def test_hostile_spec_cannot_name_arbitrary_classes(rng, tmp_path):
    save_tree(tmp_path / "h", {"a": (np.ones(2, np.float32),)})
    f = tmp_path / "h" / TREE_SPEC_FILE
    meta = json.loads(f.read_text())
    meta["spec"]["c"][0] = {"t": "namedtuple", "m": "os", "q": "system", "c": [{"t": "leaf", "i": 0}]}
    f.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing"):
        restore_tree(tmp_path / "h")


def test_failed_save_leaves_nothing(rng, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    real_save = ocp.PyTreeCheckpointer.save

    def save_then_die(self, directory, *a, **k):
        real_save(self, directory, *a, **k)  # the arrays are fully written ...
        raise KeyboardInterrupt  # ... and the process is interrupted before the spec is

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_tree(tmp_path / "x", _tree(rng))
    assert list(tmp_path.iterdir()) == []
