"""The architecture hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

from __future__ import annotations

import dataclasses
from typing import Optional

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) pairs of HF's rope_scaling dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2: True)
    sliding_window: Optional[int] = None
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[tuple] = None

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "LlamaConfig":
        """Parse a transformers ``config.json`` dict; unsupported architectures raise ValueError."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        kind = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if kind is None and model_type in SUPPORTED_ARCHITECTURES.values():
            kind = model_type
        if kind is None:
            raise ValueError(
                f"unsupported architecture {archs or model_type!r}: lowbit-jax loads "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
            rope_theta = cfg["rope_parameters"].get("rope_theta")
            if scaling is None and cfg["rope_parameters"].get("rope_type", "default") != "default":
                scaling = cfg["rope_parameters"]
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type"))
            if rope_type not in ("llama3", "default", None):
                raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: llama3)")
            if rope_type in ("default", None):
                scaling = None
            else:
                scaling = tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (dict, list))))
        eos = cfg.get("eos_token_id")
        if isinstance(eos, int):
            eos = (eos,)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", kind == "qwen2")),
            sliding_window=cfg.get("sliding_window") if kind == "mistral" else None,
            model_type=kind,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if eos else None,
        )
