"""Quantize-on-load: a Hugging Face Llama-family checkpoint into a (quantized) parameter tree.

Tensors are read one at a time (memory-mapped), moved to the accelerator, quantized there, and
the full-precision copy is dropped before the next one is read: peak host memory is about one
tensor, peak device memory about the quantized model plus one tensor.

Safetensors and PyTorch ``.bin`` checkpoints (single or sharded) are read through
``checkpoint_reader``, which validates every file and checks every shape against config.json
first. A checkpoint that transformers + bitsandbytes saved quantized is placed as stored: its
codes and scales are the model's, never requantized.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import quant, sharding, sharding_io
from lowbit_jax.convert.checkpoint_reader import CheckpointReader, iter_model_tensors, prequantized_config
from lowbit_jax.convert.safetensors_io import read_config
from lowbit_jax.models.config import LlamaConfig
from lowbit_jax.nn.config import QuantConfig, quantize_weight

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": ("input_norm", None),
    "post_attention_layernorm.weight": ("post_norm", None),
    "self_attn.q_proj.weight": ("q_proj", "kernel"),
    "self_attn.k_proj.weight": ("k_proj", "kernel"),
    "self_attn.v_proj.weight": ("v_proj", "kernel"),
    "self_attn.o_proj.weight": ("o_proj", "kernel"),
    "self_attn.q_proj.bias": ("q_proj", "bias"),
    "self_attn.k_proj.bias": ("k_proj", "bias"),
    "self_attn.v_proj.bias": ("v_proj", "bias"),
    "self_attn.o_proj.bias": ("o_proj", "bias"),
    "mlp.gate_proj.weight": ("gate_proj", "kernel"),
    "mlp.up_proj.weight": ("up_proj", "kernel"),
    "mlp.down_proj.weight": ("down_proj", "kernel"),
}


@dataclasses.dataclass
class LoadedModel:
    """A loaded checkpoint: architecture, parameter tree, and how it was quantized."""

    config: LlamaConfig
    params: dict
    quant: QuantConfig
    compute_dtype: str
    path: str
    quantized_layers: list
    tp: Optional[object] = None  # sharding.TensorParallel when loaded onto a mesh

    @property
    def int8_threshold(self) -> float:
        return self.quant.int8_threshold


def _stack(items: list, name: str, tp=None):
    if any(x is None for x in items):
        raise ValueError(f"checkpoint is missing {name} for some layers")
    if len({jax.tree.structure(x) for x in items}) > 1:  # e.g. a bitsandbytes checkpoint that skipped one layer
        kinds = sorted({str(jax.tree.structure(x)) for x in items})
        raise ValueError(f"layers store {name} in different formats ({' vs '.join(kinds)}); "
                         "stacked layers need one format per weight")
    if tp is not None:
        return sharding_io.stack_sharded(items)
    if isinstance(items[0], quant.QuantizedTensor):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *items)
    return jnp.stack(items)


def load_pretrained(
    path: str,
    quant: Optional[QuantConfig] = None,
    compute_dtype="bfloat16",
    progress: bool = True,
    device=None,
    mesh=None,
    rules=None,
) -> LoadedModel:
    """Load a Llama/Mistral/Qwen2 checkpoint, quantizing linear weights on the fly.

    ``path`` holds config.json and safetensors or PyTorch ``.bin``/``.pt`` weights (single
    file or sharded with an index). ``quant=None`` (or a config with neither 4- nor 8-bit)
    keeps every weight in ``compute_dtype``. Embeddings, norms and the LM head follow
    ``quant.skip_modules``.

    A bitsandbytes-serialized checkpoint (saved by transformers with a ``BitsAndBytesConfig``)
    loads as stored, bit for bit: ``quant`` may then be None or must name the same method, and
    the result's ``quant`` describes the checkpoint's quantization.

    ``mesh`` (a ``jax.sharding.Mesh`` with a "tp" axis, or a 1-D one) loads onto a device mesh
    instead of ``device``: ``rules`` (default ``sharding.LLAMA_TP_RULES``) split each weight,
    every device is sent only its slice and quantizes it there (``sharding_io``), so no device
    ever holds a sharded layer in full precision. The result's ``tp`` runs the model per shard.
    """
    quant_cfg = quant if quant is not None else QuantConfig(load_in_4bit=False)
    compute_dtype = jnp.dtype(compute_dtype)
    if compute_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    hf_config = read_config(path)
    config = LlamaConfig.from_hf_dict(hf_config)
    tp = None
    if mesh is not None:
        if device is not None:
            raise ValueError("pass either device= or mesh=, not both")
        tp = sharding.TensorParallel(mesh, sharding.LLAMA_TP_RULES if rules is None else rules,
                                     sharding_io._tp_axis(mesh, None))
    elif rules is not None:
        raise ValueError("rules= needs mesh= (the device mesh the rules split weights over)")
    reader = CheckpointReader(path)
    try:
        stored = prequantized_config(reader, hf_config, compute_dtype.name)
        if stored is not None:
            quant_cfg = _stored_quant(quant, stored, path)
            if tp is not None:
                raise ValueError(f"{path!r} is already quantized (bitsandbytes); load it without mesh= and place it "
                                 "with sharding.shard_tree")
    except BaseException:
        reader.close()
        raise
    device = device or jax.devices()[0]
    L = config.num_hidden_layers
    layers: dict = {}
    top: dict = {}
    quantized_layers = []
    total_bytes = sum(os.path.getsize(f) for f in reader.files)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {os.path.basename(os.path.normpath(path))}")
    seen = 0
    for name, array in _stream(reader, hf_config):
        seen += 1
        if bar is not None:
            bar.update(array.nbytes)
            bar.set_postfix_str(f"{seen} tensors")
        m = _LAYER.match(name)
        module = name.rsplit(".", 1)[0]
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if rest not in _LAYER_NAMES:
                if rest.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"unexpected tensor {name!r} for a {config.model_type} checkpoint")
            if idx >= L:
                raise ValueError(f"tensor {name!r} is beyond num_hidden_layers={L}")
            group, field = _LAYER_NAMES[rest]
            value = _convert(array, module, field, quant_cfg, compute_dtype, device, quantized_layers,
                             tp, f"['layers']['{group}']" + (f"['{field}']" if field else ""))
            slot = layers.setdefault(group, {} if field else [None] * L)
            if field:
                slot = slot.setdefault(field, [None] * L)
            slot[idx] = value
        elif name in ("model.embed_tokens.weight", "model.norm.weight"):
            key = "embed" if name == "model.embed_tokens.weight" else "norm"
            if tp is not None:  # replicated on the mesh
                top[key] = sharding_io.convert_leaf(array, f"['{key}']", None, None, compute_dtype, tp)
            else:
                top[key] = jax.device_put(np.asarray(array), device).astype(compute_dtype)
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                top["lm_head"] = {"kernel": _convert(array, "lm_head", "kernel", quant_cfg, compute_dtype, device,
                                                     quantized_layers, tp, "['lm_head']['kernel']")}
        else:
            raise ValueError(f"unexpected tensor {name!r} for a {config.model_type} checkpoint")
        del array
    if bar is not None:
        bar.close()
    for key in ("embed", "norm"):
        if key not in top:
            raise ValueError(f"checkpoint at {path!r} lacks {'model.embed_tokens.weight' if key == 'embed' else 'model.norm.weight'}")
    if not config.tie_word_embeddings and "lm_head" not in top:
        raise ValueError(f"checkpoint at {path!r} lacks lm_head.weight (and tie_word_embeddings is false)")
    stacked = {}
    for group, value in layers.items():
        if isinstance(value, dict):
            stacked[group] = {field: _stack(items, f"{group}.{field}", tp) for field, items in value.items()}
        else:
            stacked[group] = _stack(value, group, tp)
    params = {"embed": top["embed"], "layers": stacked, "norm": top["norm"]}
    if "lm_head" in top:
        params["lm_head"] = top["lm_head"]
    return LoadedModel(config, params, quant_cfg, compute_dtype.name, path, quantized_layers, tp)


def _stream(reader: CheckpointReader, hf_config: dict):
    """The checkpoint's tensors; the reader (open torch zips, file maps) closes when done."""
    with reader:
        # int8 weights record float16: bitsandbytes quantizes the fp16 copy, as quantize_weight does.
        for name, value in iter_model_tensors(reader, hf_config, int8_dtype="float16"):
            if isinstance(value, quant.QuantizedTensor) and not name.endswith(("proj.weight", "lm_head.weight")):
                raise ValueError(f"{name} is stored quantized; only linear weights may be")
            yield name, value


def _stored_quant(requested: Optional[QuantConfig], stored: QuantConfig, path: str) -> QuantConfig:
    """The config of a bitsandbytes-serialized checkpoint, after checking what the caller asked for.

    Loading never requantizes, so asking for another method (or double quant) is an error rather
    than a silent surprise; asking for none, or the same, is fine.
    """
    if requested is not None and requested.enabled:
        if (requested.method, requested.load_in_4bit and requested.double_quant) != (
            stored.method, stored.load_in_4bit and stored.double_quant
        ):
            have = stored.method + ("+double quant" if stored.load_in_4bit and stored.double_quant else "")
            raise ValueError(
                f"{path!r} is already quantized by bitsandbytes as {have}; lowbit-jax loads it as stored and does "
                f"not requantize to {requested.method}{'+double quant' if requested.double_quant else ''} "
                "(ask for no quantization -- quant=None, --quant none -- or the same method)"
            )
    return stored


def _convert(array, module: str, field: Optional[str], quant_cfg: QuantConfig, compute_dtype, device, quantized_layers,
             tp=None, tree_path: Optional[str] = None):
    """One HF tensor -> one leaf: quantized [out, in], or a Flax [in, out] kernel, or as-is.
    With ``tp`` the leaf is built on its mesh shards from the host array (sharding_io).
    An already quantized (bitsandbytes-serialized) weight is only moved to ``device``."""
    if isinstance(array, quant.QuantizedTensor):
        if field != "kernel":
            raise ValueError(f"{module}: only linear weights can be stored quantized, got a quantized {field or 'tensor'}")
        quantized_layers.append(module)
        return jax.block_until_ready(jax.device_put(array, device))
    if tp is not None and field == "kernel" and np.ndim(array) == 2:
        quantize = quant_cfg.should_quantize(module, int(np.prod(np.shape(array))))
        if quantize and not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{module}.weight has dtype {array.dtype}; quantize-on-load expects floating weights")
        if quantize:
            quantized_layers.append(module)
        return sharding_io.convert_leaf(array, tree_path, field, quant_cfg if quantize else None, compute_dtype, tp)
    if tp is not None and field != "kernel":
        return sharding_io.convert_leaf(array, tree_path, field, None, compute_dtype, tp)
    w = jax.device_put(np.asarray(array), device)
    if field != "kernel":
        return w.astype(compute_dtype)
    if w.ndim != 2:
        raise ValueError(f"{module}.weight should be 2-D, got shape {tuple(w.shape)}")
    if quant_cfg.should_quantize(module, int(np.prod(w.shape))):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"{module}.weight has dtype {w.dtype}; quantize-on-load expects floating weights")
        quantized_layers.append(module)
        q = quantize_weight(w, quant_cfg)
        return jax.block_until_ready(q)
    return w.T.astype(compute_dtype)
