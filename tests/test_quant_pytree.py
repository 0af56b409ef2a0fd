"""QuantizedTensor containers behave as pytrees; bad input gets clear errors; footprint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import quant


def _w(rng, shape=(96, 80), dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape) * 0.05, dtype)


def _all_kinds(rng):
    w = _w(rng)
    return {
        "nf4": quant.quantize_4bit(w, quant_type="nf4"),
        "fp4_dq": quant.quantize_4bit(w, quant_type="fp4", compress_statistics=True),
        "blockwise": quant.quantize_blockwise(w, blocksize=256),
        "blockwise_nested": quant.quantize_blockwise(w, blocksize=256, nested=True),
        "int8": quant.quantize_int8(w),
    }


def test_flatten_unflatten_roundtrip(rng):
    for name, q in _all_kinds(rng).items():
        leaves, treedef = jax.tree.flatten(q)
        assert all(isinstance(l, jax.Array) for l in leaves), name
        q2 = jax.tree.unflatten(treedef, leaves)
        assert type(q2) is type(q) and q2.shape == q.shape and q2.dtype == q.dtype
        np.testing.assert_array_equal(np.asarray(quant.dequantize(q2)), np.asarray(quant.dequantize(q)))


def test_jit_passes_containers_through(rng):
    qs = _all_kinds(rng)

    @jax.jit
    def f(tree):
        return jax.tree.map(lambda q: quant.dequantize(q, jnp.float32), tree, is_leaf=lambda x: isinstance(x, quant.QuantizedTensor))

    out = f(qs)
    for name, q in qs.items():
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(quant.dequantize(q, jnp.float32)))

    # Returning a container from jit keeps its static metadata.
    q = jax.jit(lambda q: q)(qs["fp4_dq"])
    assert q.quant_type == "fp4" and q.double_quant and q.blocksize == 64


def test_quantize_inside_jit_matches_eager(rng):
    w = _w(rng, (64, 130))
    eager = quant.quantize_4bit(w, compress_statistics=True)
    jitted = jax.jit(lambda w: quant.quantize_4bit(w, compress_statistics=True))(w)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tree_map_and_device_put(rng):
    q = _all_kinds(rng)["nf4"]
    moved = jax.device_put(q, jax.devices()[0])
    assert isinstance(moved, quant.Packed4bit)
    doubled = jax.tree.map(lambda a: a, q)
    np.testing.assert_array_equal(np.asarray(doubled.packed), np.asarray(q.packed))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert paths == [".packed", ".absmax"]


def test_vmap_over_stacked_layers(rng):
    ws = jnp.stack([_w(rng, (32, 64)) for _ in range(3)])
    qs = jax.vmap(lambda w: quant.quantize_4bit(w))(ws)
    assert qs.packed.shape == (3, 32 * 64 // 2)
    one = quant.quantize_4bit(ws[1])
    np.testing.assert_array_equal(np.asarray(qs.packed[1]), np.asarray(one.packed))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dequantize_dtype(rng, dtype):
    w = _w(rng).astype(dtype)
    q = quant.quantize_4bit(w)
    assert quant.dequantize_4bit(q).dtype == dtype
    assert quant.dequantize_4bit(q, jnp.float32).dtype == jnp.float32


def test_errors_name_the_argument(rng):
    w = _w(rng)
    with pytest.raises(ValueError, match="w must be float32, bfloat16 or float16"):
        quant.quantize_4bit(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quant.quantize_4bit(w, blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quant.quantize_4bit(w, quant_type="int4")
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        quant.dequantize_4bit(quant.quantize_4bit(w), jnp.int8)
    with pytest.raises(ValueError, match="q must be a Packed4bit"):
        quant.dequantize_4bit(quant.quantize_int8(w))
    with pytest.raises(ValueError, match="x must be float32"):
        quant.quantize_blockwise(jnp.ones((8,), jnp.uint8))
    with pytest.raises(ValueError, match="code must be"):
        quant.quantize_blockwise(w, code=np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="w must be 2-D"):
        quant.quantize_int8(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        quant.int8_vectorwise_quant(w, threshold=-1.0)
    with pytest.raises(ValueError, match="codes must be int8"):
        quant.int8_vectorwise_dequant(jnp.ones((2, 2), jnp.int32), jnp.ones((2,)))


def test_footprint(rng):
    w = _w(rng, (256, 256))
    tree = {"dense": w.astype(jnp.bfloat16), "q": quant.quantize_4bit(w, compress_statistics=True), "i8": quant.quantize_int8(w)}
    fp = quant.footprint(tree)
    by_name = {r[0]: r for r in fp.rows}
    assert by_name["['dense']"][3] == 256 * 256 * 2
    # NF4 + DQ: 0.5 B/param + 1 B per 64 + 4 B per 256 blocks + offset.
    expected_q = 256 * 256 // 2 + 1024 + 4 * 4 + 4
    assert by_name["['q']"][3] == expected_q
    assert by_name["['i8']"][3] == 256 * 256 + 256 * 4
    assert fp.total_params == 3 * 256 * 256
    assert 4.0 < 8 * expected_q / (256 * 256) < 4.2
    table = fp.table()
    assert "nf4+dq" in table and "total" in table


def test_partial_and_odd_sizes_roundtrip(rng):
    for shape in [(1,), (3,), (65,), (7, 9), (2, 3, 5)]:
        w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        q = quant.quantize_4bit(w, blocksize=32)
        back = quant.dequantize_4bit(q)
        assert back.shape == w.shape
        # Every value is within half the largest code gap of its block's absmax.
        assert float(jnp.max(jnp.abs(back - w))) <= float(jnp.max(jnp.abs(w))) * 0.17


def test_footprint_counts_stacked_layers(rng):
    """Models stack per-layer weights along a leading axis in one container."""
    ws = [jnp.asarray(rng.standard_normal((64, 96)), jnp.float32) for _ in range(3)]
    for make in (lambda w: quant.quantize_4bit(w, compress_statistics=True), quant.quantize_blockwise):
        qs = [make(w) for w in ws]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
        one, three = quant.footprint({"w": qs[0]}), quant.footprint({"w": stacked})
        assert three.total_params == 3 * one.total_params == 3 * 64 * 96
        assert three.total_bytes == 3 * one.total_bytes
        assert three.bits_per_param == one.bits_per_param
