"""Quantize-on-load onto an 8-device CPU mesh: same bits as load-then-shard, and no device is
ever sent a sharded layer whole."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from lowbit_jax import quant, sharding, sharding_io
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.nn.config import QuantConfig, quantize_weight

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh sets it)"
)

# A tiny Llama: 4 heads / 4 KV heads so a 4-way tensor-parallel split owns whole heads.
HF_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256, hidden_size=256,
                 intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False)
_HF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
       "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_checkpoint(path, rng, hf_config=HF_CONFIG, dtype=ml_dtypes.bfloat16):
    """A random Llama checkpoint in HF's safetensors layout (no torch needed)."""
    from safetensors.numpy import save_file

    h, i, v = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["vocab_size"]
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    t = {"model.embed_tokens.weight": rng.standard_normal((v, h)), "model.norm.weight": 1 + 0.1 * rng.standard_normal(h),
         "lm_head.weight": rng.standard_normal((v, h)) * 0.05}
    for layer in range(hf_config["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        t[pre + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        t[pre + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        for name, shape in shapes.items():
            t[pre + f"{_HF[name]}.{name}.weight"] = rng.standard_normal(shape) * 0.05
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(a, np.float32).astype(dtype) for k, a in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config))
    return path


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))


def _assert_same_leaves(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


NF4, DQ, INT8 = QuantConfig(), QuantConfig(double_quant=True, quant_type="fp4"), QuantConfig(load_in_4bit=False,
                                                                                            load_in_8bit=True)


# (512, 512): 4096 absmax, a quarter is 4 whole nested blocks; (192, 512): 384 a quarter, not.
@pytest.mark.parametrize("shape,cfg,axis", [
    ((512, 512), NF4, "out"), ((512, 512), NF4, "in"), ((512, 512), NF4, None),
    ((512, 512), DQ, "out"), ((512, 512), DQ, "in"), ((192, 512), DQ, "out"),
    ((192, 512), INT8, "out"), ((192, 512), INT8, "in"),
], ids=["nf4-out", "nf4-in", "nf4-rep", "dq-out-kept", "dq-in", "dq-out-expanded", "int8-out", "int8-in"])
def test_quantize_onto_mesh_equals_quantize_then_shard(rng, mesh, shape, cfg, axis):
    w = (rng.standard_normal(shape) * 0.05).astype(ml_dtypes.bfloat16)
    got = sharding_io.quantize_onto_mesh(w, cfg, mesh, axis)
    ref = quantize_weight(jnp.asarray(w), cfg)
    if isinstance(ref, quant.Packed4bit):
        ref = sharding.prepare_for_sharding(ref, axis, 4)
    _assert_same_leaves(got, ref)
    specs = sharding.partition_specs(got, axis, "tp")
    for leaf, spec in zip(jax.tree.leaves(got), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        assert leaf.sharding.spec == spec
    if cfg.double_quant and axis == "out":
        assert got.double_quant == (shape == (512, 512))  # kept only where whole nested blocks fit a shard


def test_load_pretrained_onto_mesh_equals_load_then_shard(tmp_path, rng, mesh, monkeypatch):
    ckpt = write_checkpoint(tmp_path / "ckpt", rng)
    cfg = QuantConfig(double_quant=True)
    sent = []  # (global shape, slice shape) of every host->device transfer
    real = sharding._host_slice
    monkeypatch.setattr(sharding, "_host_slice", lambda host, idx: sent.append((host.shape, real(host, idx).shape))
                        or real(host, idx))
    got = load_pretrained(str(ckpt), cfg, compute_dtype="float32", progress=False, mesh=mesh)
    monkeypatch.undo()
    # No device was sent a split layer whole: every linear went out in quarters (tp=4); only
    # norms and the replicated embedding / LM head travelled whole.
    split = [(full, part) for full, part in sent if part != full]
    assert all(int(np.prod(part)) * 4 == int(np.prod(full)) for full, part in split)
    assert len(split) == 2 * 7 * 8  # 2 layers x 7 linears x 8 devices
    assert len([full for full, part in sent if part == full and len(full) == 2]) == 2  # embedding, LM head

    ref = load_pretrained(str(ckpt), cfg, compute_dtype="float32", progress=False)
    placed = sharding.shard_tree(ref.params, mesh, sharding.LLAMA_TP_RULES)
    _assert_same_leaves(got.params, placed)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(placed)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    q = got.params["layers"]["q_proj"]["kernel"]
    assert q.double_quant and q.packed.sharding.spec == P(None, "tp")  # [L, n/2]: layers whole, codes split
    assert got.params["layers"]["down_proj"]["kernel"].layout == "rows"
    assert got.tp == sharding.TensorParallel(mesh, sharding.LLAMA_TP_RULES, "tp")
    # (generate() on a mesh-loaded model is checked against one device in test_sharding_multihost)


def test_load_pretrained_mesh_errors(tmp_path, rng, mesh):
    ckpt = write_checkpoint(tmp_path / "ckpt", rng)
    with pytest.raises(ValueError, match="either device= or mesh="):
        load_pretrained(str(ckpt), progress=False, mesh=mesh, device=jax.devices()[0])
    with pytest.raises(ValueError, match="rules= needs mesh="):
        load_pretrained(str(ckpt), progress=False, rules=sharding.LLAMA_TP_RULES)
    with pytest.raises(ValueError, match="'tp'"):
        load_pretrained(str(ckpt), progress=False, mesh=Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b")))
    with pytest.raises(ValueError, match="rules"):
        load_pretrained(str(ckpt), progress=False, mesh=mesh, rules=[("q_proj", "diagonal")])
    # 8-way: 256 out-features / 8 = 32 rows x 256 = whole blocks, but in-features 256 < 8 x 64.
    with pytest.raises(ValueError, match="in-features"):
        load_pretrained(str(ckpt), QuantConfig(), progress=False, mesh=Mesh(np.array(jax.devices()[:8]), ("tp",)))
