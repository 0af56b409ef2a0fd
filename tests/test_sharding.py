"""Quantized weights on an 8-device CPU mesh equal the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from lowbit_jax import ops, quant, sharding

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh sets it)"
)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))


def _weight(rng, out_f=64, in_f=1024):
    return jnp.asarray(rng.standard_normal((out_f, in_f)) * 0.05, jnp.float32)


@pytest.mark.parametrize("axis,dq,impl", [
    ("out", False, "auto"), ("out", True, "auto"), ("in", False, "auto"), ("in", True, "auto"),
    # the Pallas kernels (in the interpreter) per shard: flat+DQ out-split, rows-layout in-split
    ("out", True, "pallas_interpret"), ("in", True, "pallas_interpret"),
])
def test_sharded_forward_and_grad_equal_single_device(rng, mesh, axis, dq, impl):
    q = quant.quantize_4bit(_weight(rng), compress_statistics=dq)
    x = jnp.asarray(rng.standard_normal((6, 1024)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((64,)), jnp.float32)
    ref = ops.matmul_4bit(x, q, b)
    got = jax.jit(lambda x, b: sharding.sharded_matmul_4bit(x, q, mesh, axis, bias=b, impl=impl))(x, b)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.tanh(ops.matmul_4bit(x, q, b))))(x)
    g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(sharding.sharded_matmul_4bit(x, q, mesh, axis, bias=b,
                                                                                  impl=impl)))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5)


def test_batch_axis_splits_the_batch(rng, mesh):
    q = quant.quantize_4bit(_weight(rng, 256, 512))
    x = jnp.asarray(rng.standard_normal((4, 3, 512)), jnp.float32)
    f = jax.jit(lambda x: sharding.sharded_matmul_4bit(x, q, mesh, "out", batch_axis="dp"))
    y = f(jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp"))))
    assert y.sharding.spec == jax.sharding.PartitionSpec("dp", None, "tp")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ops.matmul_4bit(x, q)), rtol=1e-5, atol=1e-5)


def test_out_split_keeps_double_quant_when_blocks_align(rng, mesh):
    # 2048 rows x 512 / 64 = 16384 absmax, 4 shards of 4096 = whole nested blocks of 256.
    q = quant.quantize_4bit(_weight(rng, 2048, 512), compress_statistics=True)
    prepared = sharding.prepare_for_sharding(q, "out", 4)
    assert prepared.double_quant
    # An in-split cannot carry nested blocks: expanded to fp32 absmax, same values.
    rows = sharding.prepare_for_sharding(q, "in", 4)
    assert not rows.double_quant and rows.layout == "rows"
    np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(rows)), np.asarray(quant.dequantize_4bit(q)))


def test_shard_tree_places_shards(rng, mesh):
    params = {
        "q_proj": {"kernel": quant.quantize_4bit(_weight(rng, 256, 512))},
        "o_proj": {"kernel": quant.quantize_4bit(_weight(rng, 512, 256))},
        "norm": {"scale": jnp.ones((512,))},
        "int8": {"kernel": quant.quantize_int8(_weight(rng, 128, 256))},
    }
    rules = [(r"q_proj", "out"), (r"o_proj", "in"), (r"int8", "out")]
    placed = sharding.shard_tree(params, mesh, rules)
    packed = placed["q_proj"]["kernel"].packed
    assert packed.sharding.spec == jax.sharding.PartitionSpec("tp")
    # Each of the 4 tensor-parallel devices holds a quarter of the codes.
    assert {s.data.shape for s in packed.addressable_shards} == {(256 * 512 // 2 // 4,)}
    o = placed["o_proj"]["kernel"]
    assert o.layout == "rows" and o.packed.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
    assert placed["norm"]["scale"].sharding.spec == jax.sharding.PartitionSpec()
    assert placed["int8"]["kernel"].codes.sharding.spec == jax.sharding.PartitionSpec("tp", None)
    # Values are unchanged by placement.
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(ops.matmul_4bit)(x, o)), np.asarray(ops.matmul_4bit(x, params["o_proj"]["kernel"])),
        rtol=1e-5, atol=1e-5,
    )


def test_shard_tree_sends_host_weights_in_slices(rng, mesh, monkeypatch):
    """A host (numpy) tree: no device is sent a split weight whole, even one whose layout changes."""
    q = quant.quantize_4bit(_weight(rng, 256, 512), compress_statistics=True)
    host = {"o_proj": {"kernel": jax.tree.map(np.asarray, q)}, "q_proj": {"kernel": jax.tree.map(np.asarray, q)}}
    sent = []
    real = sharding._host_slice
    monkeypatch.setattr(sharding, "_host_slice", lambda h, i: sent.append((h.shape, real(h, i).shape)) or real(h, i))
    placed = sharding.shard_tree(host, mesh, [(r"q_proj", "out"), (r"o_proj", "in")])
    monkeypatch.undo()
    packed = [(full, part) for full, part in sent if full == q.packed.shape]
    assert packed and all(part[0] * 4 == full[0] for full, part in packed)
    o = placed["o_proj"]["kernel"]
    assert o.layout == "rows" and not o.double_quant and o.packed.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
    np.testing.assert_array_equal(np.asarray(quant.dequantize_4bit(o)), np.asarray(quant.dequantize_4bit(q)))
    assert placed["q_proj"]["kernel"].double_quant  # 2048 absmax a shard: whole nested blocks, kept


def test_bad_split_is_a_clear_error(rng):
    q = quant.quantize_4bit(_weight(rng, 60, 1024))
    with pytest.raises(ValueError, match="out-features"):
        sharding.prepare_for_sharding(q, "out", 8)
    with pytest.raises(ValueError, match="axis must be one of"):
        sharding.prepare_for_sharding(q, "diag", 2)
