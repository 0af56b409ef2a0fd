"""The Flax Llama-family decoder against Hugging Face transformers (torch, CPU) on tiny random
models saved by transformers itself."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.models import decode_step, forward, init_cache
from lowbit_jax.nn.config import QuantConfig

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _save(tmp_path, torch, kind, **extra):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=10000.0, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=None, **extra)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**TINY, **extra)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases, so nothing is trivially 1 or 0
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / kind)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval(), path


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
        ("llama", {"tie_word_embeddings": True}),
        ("mistral", {}),
        ("qwen2", {}),
    ],
)
def test_fp32_logits_match_transformers(tmp_path, torch, rng, kind, extra):
    model, path = _save(tmp_path, torch, kind, **extra)
    tokens = rng.integers(0, TINY["vocab_size"], size=(2, 19))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    loaded = load_pretrained(path, compute_dtype="float32", progress=False)
    logits = np.asarray(forward(loaded.params, jnp.asarray(tokens), loaded.config, jnp.float32))
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_kv_cache_decode_matches_full_forward(tmp_path, torch, rng):
    _, path = _save(tmp_path, torch, "qwen2")
    loaded = load_pretrained(path, compute_dtype="float32", progress=False)
    tokens = jnp.asarray(rng.integers(0, TINY["vocab_size"], size=(1, 12)))
    full = forward(loaded.params, tokens, loaded.config, jnp.float32)
    cache = init_cache(loaded.config, 1, 32, jnp.float32)
    logits, cache = decode_step(loaded.params, tokens[:, :8], cache, 0, loaded.config, jnp.float32)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 7]), rtol=1e-4, atol=1e-4)
    for i in range(8, 12):
        logits, cache = decode_step(loaded.params, tokens[:, i:i + 1], cache, i, loaded.config, jnp.float32)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, i]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_quantized_model_matches_transformers_bitsandbytes(tmp_path, torch, bnbF, rng, method):
    """Same codes as transformers + bitsandbytes' Linear4bit/Linear8bitLt, logits within tolerance.

    Layer widths are multiples of the blocksize: bitsandbytes 0.50.2's CPU dequantize kernel is
    wrong when a block straddles rows (see test_quant_parity.test_bnb_cpu_dequant_bug_is_theirs).
    """
    import bitsandbytes as bnb

    model, path = _save(tmp_path, torch, "llama")
    cfg = QuantConfig(load_in_4bit=method != "int8", load_in_8bit=method == "int8",
                      quant_type="nf4" if method == "int8" else method, min_size=0, compute_dtype="float32")
    loaded = load_pretrained(path, quant=cfg, compute_dtype="float32", progress=False)
    assert len(loaded.quantized_layers) == 2 * 7
    # Build the bitsandbytes model the way transformers does (replace nn.Linear, keep lm_head).
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    lin = getattr(parent, n)
                    if method == "int8":
                        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False, threshold=6.0)
                        new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                    else:
                        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32, quant_type=method)
                        new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=method)
                    new = new.to("cpu") if method == "int8" else new._apply(lambda t: t)
                    setattr(parent, n, new)
    # Trigger quantization (bnb quantizes when moved to a device; on the CPU, call it explicitly).
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and not getattr(mod.weight, "bnb_quantized", False):
            mod.weight = mod.weight._quantize("cpu")
        if isinstance(mod, bnb.nn.Linear8bitLt) and mod.weight.CB is None:
            mod.weight = mod.weight._quantize("cpu") if hasattr(mod.weight, "_quantize") else mod.weight.cpu()
    q_ours = loaded.params["layers"]["q_proj"]["kernel"]
    q_bnb = model.model.layers[1].self_attn.q_proj.weight
    if method == "int8":
        np.testing.assert_array_equal(np.asarray(q_ours.codes[1]), q_bnb.CB.numpy())
    else:
        np.testing.assert_array_equal(np.asarray(q_ours.packed[1]), q_bnb.data.numpy().reshape(-1))
    tokens = rng.integers(0, TINY["vocab_size"], size=(1, 16))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.float().numpy()
    logits = np.asarray(forward(loaded.params, jnp.asarray(tokens), loaded.config, jnp.float32, loaded.int8_threshold))
    # bitsandbytes dequantizes with its own CPU kernel (differs from its torch reference by ~1e-5
    # relative); the logits then agree to well under the 4-bit error itself.
    # int8: bitsandbytes also rounds the activations through float16 before quantizing them.
    tol = 1.5e-2 if method == "int8" else 5e-3
    np.testing.assert_allclose(logits, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_pretrained(str(d), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "missing"), progress=False)
