"""LoRA adapters on the stacked-layer Llama tree: add, merge, and save in PEFT's format.

``lowbit_jax.nn.lora`` works on Linen trees with one 2-D kernel per module. The decoder in
``lowbit_jax.models.llama`` stacks its layers on a leading axis (one ``lax.scan`` compiles one
layer), so here each adapter is stacked too: ``lora_A [L, in, r]``, ``lora_B [L, r, out]``
beside ``layers/<name>/kernel`` -- the same key names, so ``split_trainable``, ``combine``
and ``trainable_mask`` from ``nn.lora`` apply unchanged, and the model's forward adds
``scale * x @ A @ B`` wherever it finds them.

On disk the adapters are PEFT's: ``adapter_model.safetensors`` (``lora_A.weight [r, in]``,
``lora_B.weight [out, r]``, one pair per layer and module) + ``adapter_config.json``, so
``PeftModel.from_pretrained`` on the same base loads them.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import quant
from lowbit_jax.models.llama import LINEARS
from lowbit_jax.nn.lora import LoraConfig, init_lora_weights, requantize_like

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_HF_MODULE = {name: ("self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for name in LINEARS}


def _in_out(kernel) -> tuple[int, int]:
    """Per-layer (in, out) of a stacked kernel: float [L, in, out] or quantized [out, in] per layer."""
    if isinstance(kernel, quant.QuantizedTensor):
        out_f, in_f = kernel.shape
        return in_f, out_f
    return int(kernel.shape[-2]), int(kernel.shape[-1])


def _num_layers(params) -> int:
    return int(jax.tree.leaves(params["layers"]["input_norm"])[0].shape[0])


def targeted(config: LoraConfig) -> list[str]:
    """The decoder's linear modules that ``config.target_modules`` selects ("layers/q_proj" paths)."""
    return [name for name in LINEARS if config.matches(f"layers/{name}")]


def add_adapters(params, config: LoraConfig, key, dtype=jnp.float32):
    """A new tree with ``lora_A``/``lora_B`` beside every targeted kernel, B zero (so the
    adapted model starts equal to the base), A as PEFT initialises it, per layer."""
    names = targeted(config)
    if not names:
        raise ValueError(f"target_modules {config.target_modules!r} matched none of {list(LINEARS)}")
    L = _num_layers(params)
    layers = dict(params["layers"])
    for i, name in enumerate(names):
        in_f, out_f = _in_out(layers[name]["kernel"])
        keys = jax.random.split(jax.random.fold_in(key, i), L)
        a, b = jax.vmap(lambda k: init_lora_weights(k, in_f, out_f, config.r, dtype))(keys)
        layers[name] = {**layers[name], "lora_A": a, "lora_B": b}
    return {**params, "layers": layers}


def adapter_tree(params) -> dict:
    """Only the adapters: ``{"layers": {name: {"lora_A", "lora_B"}}}`` (what training updates)."""
    return {"layers": {name: {"lora_A": p["lora_A"], "lora_B": p["lora_B"]}
                       for name, p in params["layers"].items() if isinstance(p, dict) and "lora_A" in p}}


def merge_adapters(params, config: LoraConfig, *, requantize: bool = False, dtype=jnp.bfloat16):
    """PEFT's ``merge_and_unload``: ``W + scale * A @ B`` into every adapted kernel, adapters gone.

    A quantized kernel is dequantized one layer at a time and merged into ``dtype`` (bf16 by
    default), or with ``requantize=True`` quantized again in its own format (NF4 stays NF4, so
    the merged model keeps its memory footprint; the merge then carries a re-rounding error).
    """
    layers = {}
    for name, p in params["layers"].items():
        if not (isinstance(p, dict) and "lora_A" in p):
            layers[name] = p
            continue
        p = dict(p)
        a, b, k = p.pop("lora_A"), p.pop("lora_B"), p["kernel"]
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * config.scale
        if isinstance(k, quant.QuantizedTensor):
            def merge_one(q, d):
                w = quant.dequantize(q, jnp.float32) + d.T  # [out, in]
                return requantize_like(w.astype(q.dtype), q) if requantize else w.T.astype(dtype)

            p["kernel"] = jax.lax.map(lambda qd: merge_one(*qd), (k, delta))
        else:
            p["kernel"] = (k.astype(jnp.float32) + delta).astype(k.dtype)
        layers[name] = p
    return {**params, "layers": layers}


def peft_state_dict(params) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names and layouts (float32 numpy)."""
    out = {}
    for name, p in adapter_tree(params)["layers"].items():
        a = np.asarray(jax.device_get(p["lora_A"]), np.float32)  # [L, in, r]
        b = np.asarray(jax.device_get(p["lora_B"]), np.float32)  # [L, r, out]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[name]}.{name}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def peft_adapter_config(config: LoraConfig, base_model: Optional[str] = None) -> dict:
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(config.r),
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapters(path: str, params, config: LoraConfig, base_model: Optional[str] = None,
                  orbax: bool = True, overwrite: bool = True) -> str:
    """Write ``path/`` with PEFT's two files and (``orbax=True``) an orbax copy of the adapter
    tree under ``path/orbax`` -- atomically: the directory appears only once complete."""
    from safetensors.numpy import save_file

    from lowbit_jax.convert.atomic import atomic_dir

    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(peft_state_dict(params), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(config, base_model), indent=2))
        if orbax:
            from lowbit_jax.convert.orbax_io import save_tree

            save_tree(tmp / "orbax", jax.device_get(adapter_tree(params)))
    return path


def load_adapters(path: str, params) -> tuple[dict, LoraConfig]:
    """Read a PEFT adapter directory onto ``params`` (the same base architecture): returns the
    tree with ``lora_A``/``lora_B`` in place and the LoraConfig it was saved with."""
    from lowbit_jax.convert.safety import read_safetensors_checked

    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    config = LoraConfig(r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"], lora_dropout=cfg.get("lora_dropout", 0.0),
                        target_modules=cfg["target_modules"])
    sd = read_safetensors_checked(os.path.join(path, ADAPTER_WEIGHTS))
    L = _num_layers(params)
    layers = dict(params["layers"])
    for name in targeted(config):
        hf = _HF_MODULE[name]
        try:
            a = np.stack([sd[f"base_model.model.model.layers.{i}.{hf}.{name}.lora_A.weight"].T for i in range(L)])
            b = np.stack([sd[f"base_model.model.model.layers.{i}.{hf}.{name}.lora_B.weight"].T for i in range(L)])
        except KeyError as e:
            raise ValueError(f"{path}: adapter file lacks {e.args[0]}") from None
        in_f, out_f = _in_out(layers[name]["kernel"])
        if a.shape != (L, in_f, config.r) or b.shape != (L, config.r, out_f):
            raise ValueError(f"{path}: {name} adapters have shapes {a.shape}/{b.shape}, the model wants "
                             f"{(L, in_f, config.r)}/{(L, config.r, out_f)}")
        layers[name] = {**layers[name], "lora_A": jnp.asarray(a, jnp.float32), "lora_B": jnp.asarray(b, jnp.float32)}
    return {**params, "layers": layers}, config
