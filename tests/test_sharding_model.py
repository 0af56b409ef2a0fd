"""A tensor-parallel (and data-parallel) NF4 Llama on an 8-device CPU mesh equals one device:
forward, KV-cache decode, a QLoRA step with adamw8bit, and orbax save/restore across meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from lowbit_jax import quant, sharding, sharding_io
from lowbit_jax.convert.orbax_io import restore_tree, save_tree
from lowbit_jax.models import llama
from lowbit_jax.models.config import LlamaConfig
from lowbit_jax.nn.lora import combine, split_trainable
from lowbit_jax.optim import adamw8bit

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh sets it)"
)

# 8 query / 4 KV heads: a 4-way split owns whole heads (GQA groups stay on one device).
CONFIG = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-5)
LORA_SCALE = 2.0


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))


def nf4_params(seed=0, double_quant=True):
    """A random stacked Llama tree, linears in NF4 (+DQ): q/k/v/gate/up keep DQ when split 4 ways."""
    params = llama.init_params(CONFIG, jax.random.key(seed), scale=0.05)
    for name in llama.LINEARS:
        kernel = params["layers"][name]["kernel"]  # [L, in, out]
        params["layers"][name]["kernel"] = jax.vmap(
            lambda k: quant.quantize_4bit(k.T, compress_statistics=double_quant))(kernel)
    params["layers"]["input_norm"] = 1 + 0.1 * jax.random.normal(jax.random.key(seed + 1), (2, 256))
    return params


def add_lora(params, seed=1, r=8):
    """LoRA on q/v, both factors random (B too, so A gets a gradient on the first step)."""
    keys = iter(jax.random.split(jax.random.key(seed), 4))
    out = {**params, "layers": dict(params["layers"])}
    for name in ("q_proj", "v_proj"):
        q = params["layers"][name]["kernel"]
        o, i = q.shape
        out["layers"][name] = {**params["layers"][name],
                               "lora_A": jax.random.normal(next(keys), (2, i, r)) / np.sqrt(i),
                               "lora_B": jax.random.normal(next(keys), (2, r, o)) * 0.05}
    return out


def _tokens(rng, b=4, t=12):
    return jnp.asarray(rng.integers(0, CONFIG.vocab_size, (b, t)), jnp.int32)


def test_tensor_parallel_forward_equals_single_device(rng, mesh):
    params = nf4_params()
    tp = sharding.TensorParallel(mesh, batch_axis="dp")
    placed = tp.place(params)
    tokens = _tokens(rng)
    ref = llama.forward(params, tokens, CONFIG)
    tokens_sh = jax.device_put(tokens, tp.batch_sharding())
    compiled = llama.forward.lower(placed, tokens_sh, CONFIG, tp=tp).compile()
    np.testing.assert_allclose(np.asarray(compiled(placed, tokens_sh)), np.asarray(ref), rtol=2e-5, atol=2e-5)
    # Every 4-bit weight is multiplied shard by shard: the compiled program never gathers codes.
    gathers = [line for line in compiled.as_text().splitlines() if "all-gather" in line and "u8[" in line]
    assert not gathers, gathers[:3]


def test_tensor_parallel_decode_equals_single_device(rng, mesh):
    params = nf4_params(seed=2)
    tp = sharding.TensorParallel(Mesh(np.array(jax.devices()[:4]), ("tp",)))  # batch 1: TP only
    placed = tp.place(params)
    prompt = _tokens(rng, 1, 5)
    outs = []
    for p, plan in ((params, None), (placed, tp)):
        cache = llama.init_cache(CONFIG, 1, 8, jnp.float32)
        if plan is not None:
            cache = jax.device_put(cache, plan.cache_sharding())
        logits, cache = llama.decode_step(p, prompt, cache, 0, CONFIG, tp=plan)
        seq = [logits]
        for i in range(3):
            tok = jnp.argmax(seq[-1], -1)[:, None].astype(jnp.int32)
            logits, cache = llama.decode_step(p, tok, cache, 5 + i, CONFIG, tp=plan)
            seq.append(logits)
        outs.append(np.stack([np.asarray(x) for x in seq]))
        if plan is not None:
            assert cache["k"].sharding.is_equivalent_to(plan.cache_sharding(), 5)
    np.testing.assert_allclose(outs[1], outs[0], rtol=2e-5, atol=2e-5)


def _loss(trainable, frozen, tokens, tp):
    logits = llama.forward(combine(trainable, frozen), tokens[:, :-1], CONFIG, tp=tp, lora_scale=LORA_SCALE)
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def _step(opt, tp):
    def step(trainable, opt_state, frozen, tokens):
        loss, grads = jax.value_and_grad(_loss)(trainable, frozen, tokens, tp)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, grads

    return step


def _moments(state):
    return [np.asarray(quant.dequantize(m, jnp.float32)) for m in jax.tree.leaves(
        (state[0].mu, state[0].nu), is_leaf=lambda x: isinstance(x, quant.QuantizedTensor))]


def test_qlora_step_data_and_tensor_parallel_equals_single_device(rng, mesh):
    """LoRA on q/v over an NF4 base, adamw8bit: two steps on a 2 (data) x 4 (tensor) mesh."""
    trainable, frozen = split_trainable(add_lora(nf4_params(seed=3)))
    opt = adamw8bit(1e-2)
    tokens = _tokens(rng, 4, 13)

    state = opt.init(trainable)
    step = jax.jit(_step(opt, None))
    t1, s1, losses, grads = trainable, state, [], []
    for _ in range(2):
        t1, s1, loss, g = step(t1, s1, frozen, tokens)
        losses.append(float(loss))
        grads.append(g)

    tp = sharding.TensorParallel(mesh, batch_axis="dp")
    t_sh = tp.place(trainable)
    f_sh = tp.place(frozen)
    p_shardings = jax.tree.map(lambda x: x.sharding, t_sh)
    s_shardings = sharding.state_shardings(jax.eval_shape(opt.init, t_sh), p_shardings)
    s_sh = jax.jit(opt.init, out_shardings=s_shardings)(t_sh)
    step_sh = jax.jit(_step(opt, tp), out_shardings=(p_shardings, s_shardings, None, p_shardings))
    tokens_sh = jax.device_put(tokens, tp.batch_sharding())
    t2, s2, losses_sh = t_sh, s_sh, []
    for i in range(2):
        t2, s2, loss, g = step_sh(t2, s2, f_sh, tokens_sh)
        losses_sh.append(float(loss))
        if i == 0:  # the first step's gradients: same inputs, so the same up to summation order
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads[0])):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)

    np.testing.assert_allclose(losses_sh, losses, rtol=1e-5)
    # Same gradients; after two steps the same adapters up to the 8-bit moments' rounding: a
    # last-bit difference in a gradient can move a moment to the neighbouring code, which moves
    # that element's update by a fraction of the learning rate (and nothing else).
    for a, b in zip(jax.tree.leaves(t2), jax.tree.leaves(t1)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=0.1 * 1e-2)
        assert np.mean(np.abs(a - b) > 1e-5) < 0.01
    # The adapters changed, and the states shard like the parameters they belong to.
    assert not np.allclose(np.asarray(t2["layers"]["q_proj"]["lora_A"]), np.asarray(trainable["layers"]["q_proj"]["lora_A"]))
    b_sharding = t2["layers"]["q_proj"]["lora_B"].sharding  # [L, r, out]: split like q_proj's output
    assert b_sharding.spec == P(None, None, "tp")
    assert s2[0].mu["layers"]["q_proj"]["lora_B"].codes.sharding.is_equivalent_to(b_sharding, 3)  # 8-bit
    v_sharding = t2["layers"]["v_proj"]["lora_B"].sharding  # 2048 elements: fp32 moments, split the same
    assert s2[0].nu["layers"]["v_proj"]["lora_B"].sharding.is_equivalent_to(v_sharding, 3)


def test_orbax_save_on_one_mesh_restore_onto_another(mesh, tmp_path):
    params = nf4_params(seed=4)
    tp4 = sharding.TensorParallel(mesh)  # 2 x 4: 4-way tensor parallel
    placed = tp4.place(params)
    save_tree(tmp_path / "model", placed)

    mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("dp", "tp"))  # 2-way tensor parallel
    back = sharding_io.restore_onto_mesh(tmp_path / "model", mesh2, sharding.LLAMA_TP_RULES)
    tp2 = sharding.TensorParallel(mesh2)
    assert jax.tree.structure(back) == jax.tree.structure(placed)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(placed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    expected = tp2.shardings(back)
    for leaf, sh in zip(jax.tree.leaves(back), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    assert back["layers"]["gate_proj"]["kernel"].packed.addressable_shards[0].data.shape[-1] * 2 == \
        back["layers"]["gate_proj"]["kernel"].packed.shape[-1]
    # (same bits, placed as tp2.place would: the forward test's equality carries over)

    # A checkpoint saved from one device, in the canonical layout (what `convert` writes), goes
    # onto a mesh too: weights whose split needs another layout are re-laid-out on the mesh.
    save_tree(tmp_path / "canonical", jax.device_get(params))
    back = sharding_io.restore_onto_mesh(tmp_path / "canonical", mesh2, sharding.LLAMA_TP_RULES)
    placed2 = tp2.place(params)
    assert back["layers"]["down_proj"]["kernel"].layout == "rows"
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(placed2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)

    # An 8-bit optimizer state saved sharded comes back sharded like the new mesh's parameters.
    trainable, _ = split_trainable(add_lora(params))
    opt = adamw8bit(1e-3)
    t4 = tp4.place(trainable)
    s4 = jax.jit(opt.init, out_shardings=sharding.state_shardings(
        jax.eval_shape(opt.init, t4), jax.tree.map(lambda x: x.sharding, t4)))(t4)
    save_tree(tmp_path / "opt", s4)
    t2 = tp2.place(trainable)
    s_sh = sharding.state_shardings(jax.eval_shape(opt.init, t2), jax.tree.map(lambda x: x.sharding, t2))
    s2 = restore_tree(tmp_path / "opt", sharding=s_sh)
    codes = s2[0].mu["layers"]["q_proj"]["lora_B"].codes
    assert codes.sharding.is_equivalent_to(t2["layers"]["q_proj"]["lora_B"].sharding, 3)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tree_shardings_refuses_a_layout_the_split_cannot_use(mesh):
    q = quant.quantize_4bit(jnp.ones((64, 512)), compress_statistics=True)  # 512 blocks: 2 nested blocks
    tree = {"layers": {"q_proj": {"kernel": sharding.prepare_for_sharding(q, "out", 2)}}}
    assert tree["layers"]["q_proj"]["kernel"].double_quant
    with pytest.raises(ValueError, match="straddle shards"):  # 4 shards of 128 absmax: nested blocks cut
        sharding.tree_shardings(tree, mesh, sharding.LLAMA_TP_RULES)
    rows = {"layers": {"q_proj": {"kernel": quant.to_rows(q.replace(absmax=quant.absmax_4bit(q), nested_absmax=None,
                                                                     offset=None))}}}
    with pytest.raises(ValueError, match="flat layout"):
        sharding.tree_shardings(rows, mesh, sharding.LLAMA_TP_RULES)
    with pytest.raises(ValueError, match="batch_axis"):
        sharding.TensorParallel(mesh, batch_axis="tp")
    with pytest.raises(ValueError, match="not an axis"):
        sharding.TensorParallel(mesh, axis="model")


def test_layer_indexed_decode_matches_scanned_slices(monkeypatch):
    # decode_step's one-token path carries the layer index and reads the stacked NF4 kernels in
    # place (LayerKernel); the plain scan over sliced layers gives the same logits and cache
    params = nf4_params(3)
    tokens = jnp.asarray([[5, 9, 2, 7, 1]], jnp.int32)
    outs = {}
    for indexed, inplace in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(llama, "LAYER_INDEXED_DECODE", indexed)
        monkeypatch.setattr(llama, "INPLACE_CACHE", inplace)
        jax.clear_caches()
        cache = llama.init_cache(CONFIG, 1, 8, jnp.float32)
        logits, cache = llama.decode_step(params, tokens[:, :3], cache, 0, CONFIG, jnp.float32)
        seq = [logits]
        for i in (3, 4):  # two one-token steps: the second reads what the first wrote
            logits, cache = llama.decode_step(params, tokens[:, i:i + 1], cache, i, CONFIG, jnp.float32)
            seq.append(logits)
        outs[indexed, inplace] = (np.stack([np.asarray(x) for x in seq]), np.asarray(cache["k"]), np.asarray(cache["v"]))
    for variant in ((True, True), (True, False)):
        for a, b in zip(outs[variant], outs[False, False]):
            np.testing.assert_array_equal(a, b)


def test_layer_indexed_decode_tensor_parallel_kernels(monkeypatch):
    # The same with a 4-way plan and the Pallas kernels (interpreted) per shard: each shard's
    # GEMV reads its part of the stacked layer in place; bf16 compute (the GEMV's dtype)
    params = nf4_params(4)
    tp = sharding.TensorParallel(Mesh(np.array(jax.devices()[:4]), ("tp",)), impl="pallas_interpret")
    placed = tp.place(params)
    tokens = jnp.asarray([[3, 1, 4, 1]], jnp.int32)
    outs = {}
    for indexed in (True, False):
        monkeypatch.setattr(llama, "LAYER_INDEXED_DECODE", indexed)
        jax.clear_caches()
        cache = jax.device_put(llama.init_cache(CONFIG, 1, 8, jnp.bfloat16), tp.cache_sharding())
        logits, cache = llama.decode_step(placed, tokens[:, :3], cache, 0, CONFIG, jnp.bfloat16, tp=tp)
        logits, cache = llama.decode_step(placed, tokens[:, 3:], cache, 3, CONFIG, jnp.bfloat16, tp=tp)
        outs[indexed] = (np.asarray(logits, np.float32), np.asarray(cache["k"], np.float32))
    for a, b in zip(outs[True], outs[False]):
        np.testing.assert_array_equal(a, b)
