"""A tiny, random, complete Hugging Face Llama checkpoint, made offline in about a second.

Tests, the notebooks (in CI) and the README snippets need a real checkpoint *directory* --
``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` with a
chat template -- to exercise the same paths a user's model takes (load, quantize on load,
tokenize, chat-format, fine-tune, convert), without a download and in seconds. The tokenizer is
a byte-level BPE trained on the standard library's ``pydoc_data.topics``; the weights are
seeded normals (scale 0.02), so the model is random but its text round-trips.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lowbit_jax.convert.atomic import atomic_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _train_tokenizer(vocab_size: int, chars: int):
    import pydoc_data.topics as topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:chars]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return tok


def tiny_checkpoint(path: str, *, vocab_size: int = 512, hidden_size: int = 64, num_hidden_layers: int = 2,
                    num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 128,
                    tie_word_embeddings: bool = True, seed: int = 0, overwrite: bool = False) -> str:
    """Write (once; again with ``overwrite``) a random Llama checkpoint directory at ``path``."""
    from safetensors.numpy import save_file

    if os.path.exists(os.path.join(path, "model.safetensors")) and not overwrite:
        return path
    tok = _train_tokenizer(vocab_size, chars=200_000)
    vocab = tok.get_vocab_size()
    head_dim = hidden_size // num_attention_heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": tok.token_to_id("<|im_start|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"), "pad_token_id": tok.token_to_id("<|im_end|>"),
        "torch_dtype": "float32", "hidden_act": "silu",
    }
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    qd, kvd = num_attention_heads * head_dim, num_key_value_heads * head_dim
    tensors = {"model.embed_tokens.weight": normal(vocab, hidden_size),
               "model.norm.weight": np.ones(hidden_size, np.float32)}
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = normal(vocab, hidden_size)
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden_size, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden_size, np.float32),
            p + "self_attn.q_proj.weight": normal(qd, hidden_size),
            p + "self_attn.k_proj.weight": normal(kvd, hidden_size),
            p + "self_attn.v_proj.weight": normal(kvd, hidden_size),
            p + "self_attn.o_proj.weight": normal(hidden_size, qd),
            p + "mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": normal(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": normal(hidden_size, intermediate_size),
        })
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "pad_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE, "add_bos_token": False,
               "model_max_length": 2048}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with atomic_dir(path, overwrite=True) as tmp_dir:
        save_file(tensors, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
        tok.save(os.path.join(tmp_dir, "tokenizer.json"))
        with open(os.path.join(tmp_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp_dir, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2)
    return path
