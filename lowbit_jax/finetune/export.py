"""A merged (adapter-free) decoder tree back into a Hugging Face checkpoint directory.

After ``merge_adapters`` the fine-tuned model is an ordinary tree; written as
``model.safetensors`` under transformers' names (with the base's config and tokenizer files),
every tool reads it: ``lowbit-jax eval/generate/convert`` (quantizing it again on load),
transformers, llama.cpp's converter.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from lowbit_jax import quant
from lowbit_jax.convert.load import _LAYER_NAMES

_COPY_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def hf_state_dict(params) -> dict[str, np.ndarray]:
    """transformers' names and ``[out, in]`` layouts; quantized kernels are dequantized (one
    layer at a time, on the host)."""
    def host(x):  # contiguous: safetensors writes the buffer as laid out, strides ignored
        return np.ascontiguousarray(np.asarray(jax.device_get(x)))

    def weight_rows(k, i):  # one layer's [out, in] weight
        if isinstance(k, quant.QuantizedTensor):
            return host(quant.dequantize(quant.layer_slice(k, i)))
        return np.ascontiguousarray(host(k[i]).T)

    layers = params["layers"]
    n = int(layers["input_norm"].shape[0])
    sd = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["norm"])}
    if "lm_head" in params:
        k = params["lm_head"]["kernel"]
        sd["lm_head.weight"] = host(quant.dequantize(k) if isinstance(k, quant.QuantizedTensor) else k.T)
    for hf_name, (group, field) in _LAYER_NAMES.items():
        if group not in layers or (field is not None and field not in layers[group]):
            continue
        for i in range(n):
            if field is None:
                value = host(layers[group][i])
            elif field == "kernel":
                value = weight_rows(layers[group]["kernel"], i)
            else:
                value = host(layers[group][field][i])
            sd[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(value)
    return sd


def save_hf_checkpoint(path: str, params, base_dir: str, overwrite: bool = True) -> str:
    """Write ``path/model.safetensors`` from ``params`` plus the base's config and tokenizer
    files, atomically. Raises if adapters are still in the tree (merge them first)."""
    from safetensors.numpy import save_file

    from lowbit_jax.convert.atomic import atomic_dir

    if any(isinstance(p, dict) and "lora_A" in p for p in params["layers"].values()):
        raise ValueError("the tree still holds LoRA adapters: merge them first (finetune.merge_adapters)")
    sd = hf_state_dict(params)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in _COPY_FILES:
            src = os.path.join(base_dir, name)
            if os.path.exists(src):
                shutil.copy(src, tmp / name)
    return path
