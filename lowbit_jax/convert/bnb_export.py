"""A loaded (quantized) model written as a Hugging Face + bitsandbytes checkpoint directory.

The inverse of loading a bitsandbytes-serialized checkpoint: the same codes and scales under
the names, dtypes and layouts transformers + bitsandbytes write (``bnb_format``), plus the
``quantization_config`` in config.json that makes ``from_pretrained`` build ``Linear4bit`` /
``Linear8bitLt`` layers and load them as they are -- so a PyTorch user gets our exact model.

Stacked layers are unstacked one tensor at a time and streamed into safetensors shards, so the
host holds one layer's weight at a time, not the model. Everything is written into a hidden
temporary directory that is renamed into place only when complete (``atomic.atomic_dir``): an
interrupted export leaves no directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from lowbit_jax import quant
from lowbit_jax.convert.atomic import atomic_dir
from lowbit_jax.convert.bnb_format import (
    QUANT_STATE_PREFIX,
    _pack_json,
    bnb_quantization_config,
    packed4bit_to_bnb,
    rowwise_int8_to_bnb,
)
from lowbit_jax.convert.safety import SAFETENSORS_DTYPES, numpy_dtype

__all__ = ["export_bnb_checkpoint", "COPIED_FILES"]

PathLike = Union[str, os.PathLike]
# Files beside the weights that a PyTorch user needs to run the model; copied when present.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "generation_config.json", "chat_template.jinja")  # fmt: skip
_TAGS = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}  # numpy dtype name -> safetensors tag
# Our tree's layer groups -> the HF module under model.layers.<i>.
_HF_MODULES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj", "input_norm": "input_layernorm", "post_norm": "post_attention_layernorm",
}  # fmt: skip

# One tensor to write: name, dtype name, shape, and a function producing its numpy value. Entries
# come in groups (one tensor, or one quantized weight's keys) that a shard never splits.
_Entry = tuple[str, str, tuple, Callable[[], np.ndarray]]


def _nbytes(entry: _Entry) -> int:
    return int(np.prod(entry[2], dtype=np.int64)) * numpy_dtype(entry[1]).itemsize


def _layer(leaf, i: int):
    return jax.tree.map(lambda x: x[i], leaf)


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _quant_state_json(q: quant.Packed4bit, offset: Optional[float]) -> dict:
    qs: dict[str, Any] = {"quant_type": q.quant_type, "blocksize": int(q.blocksize), "dtype": str(q.dtype),
                          "shape": list(q.shape)}  # fmt: skip
    if q.double_quant:
        qs.update({"nested_blocksize": int(q.nested_blocksize), "nested_dtype": "float32", "nested_offset": offset})
    return qs


class _GroupCache:
    """The entries of the quantized weight being written, computed once for all its keys."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make):
        if key != self.key:
            self.key, self.value = key, make()
        return self.value


def _quantized_entries(name: str, q, i: Optional[int], cache: _GroupCache) -> list[_Entry]:
    """The bitsandbytes keys of weight ``name`` (layer ``i`` of a stacked leaf, or all of it)."""
    def layer():
        x = q if i is None else _layer(q, i)
        if isinstance(x, quant.Packed4bit):
            x = quant.to_flat(x) if x.layout != "bnb" else x
            return packed4bit_to_bnb(jax.device_get(x), prefix=name)
        return rowwise_int8_to_bnb(jax.device_get(x), prefix=name[: -len("weight")])

    def get(key):
        return lambda: cache.get(name, layer)[key]

    lead = () if i is None else (0,)
    if isinstance(q, quant.Packed4bit):
        per = lambda a: int(np.prod(np.shape(a)[len(lead):], dtype=np.int64))  # noqa: E731
        offset = None
        if q.double_quant:
            off = _host(q.offset)
            offset = float(np.float32(off if i is None else off[i]))
        qs_bytes = _pack_json(_quant_state_json(q, offset))
        entries = [
            (name, q.quant_storage, (per(q.packed) // numpy_dtype(q.quant_storage).itemsize, 1), get(name)),
            (f"{name}.absmax", np.dtype(q.absmax.dtype).name, (per(q.absmax),), get(f"{name}.absmax")),
            (f"{name}.quant_map", "float32", (16,), get(f"{name}.quant_map")),
        ]  # fmt: skip
        if q.double_quant:
            entries += [(f"{name}.nested_absmax", "float32", (per(q.nested_absmax),), get(f"{name}.nested_absmax")),
                        (f"{name}.nested_quant_map", "float32", (256,), get(f"{name}.nested_quant_map"))]  # fmt: skip
        key = f"{name}.{QUANT_STATE_PREFIX}{q.quant_type}"
        entries.append((key, "uint8", (len(qs_bytes),), lambda: qs_bytes))
        return entries
    prefix = name[: -len("weight")]
    out_f, in_f = q.shape[-2], q.shape[-1]
    return [(name, "int8", (out_f, in_f), get(name)), (prefix + "SCB", "float32", (out_f,), get(prefix + "SCB")),
            (prefix + "weight_format", "uint8", (), get(prefix + "weight_format"))]  # fmt: skip


def _plain(name: str, leaf, i: Optional[int], transpose: bool) -> _Entry:
    shape = tuple(leaf.shape[0 if i is None else 1 :])
    if transpose:  # Flax [in, out] kernel -> PyTorch [out, in]
        shape = shape[::-1]

    def value():
        x = _host(leaf if i is None else leaf[i])
        return np.ascontiguousarray(x.T if transpose else x)

    return name, np.dtype(leaf.dtype).name, shape, value


def _groups(params: dict, num_layers: int) -> tuple[list[list[_Entry]], str, dict]:
    """Every tensor to write (grouped), the quantization method, and the unquantized linears."""
    cache = _GroupCache()
    groups: list[list[_Entry]] = [[_plain("model.embed_tokens.weight", params["embed"], None, False)],
                                  [_plain("model.norm.weight", params["norm"], None, False)]]  # fmt: skip
    methods: set[str] = set()
    plain_linears: list[str] = []
    first_q = None

    def linear(module: str, p: dict, i: Optional[int]):
        nonlocal first_q
        extra = sorted(set(p) - {"kernel", "bias"})
        if extra:
            raise ValueError(f"{module} has {extra} beside its kernel: merge or drop the LoRA adapters before exporting")
        k = p["kernel"]
        if isinstance(k, quant.QuantizedTensor):
            if not isinstance(k, (quant.Packed4bit, quant.RowwiseInt8)):
                raise ValueError(f"{module}: {type(k).__name__} has no bitsandbytes checkpoint format")
            methods.add(k.quant_type if isinstance(k, quant.Packed4bit) else "int8")
            first_q = first_q or k
            groups.append(_quantized_entries(f"{module}.weight", k, i, cache))
        else:
            plain_linears.append(module)
            groups.append([_plain(f"{module}.weight", k, i, True)])
        if "bias" in p:
            groups.append([_plain(f"{module}.bias", p["bias"], i, False)])

    layers = params["layers"]
    unknown = sorted(set(layers) - set(_HF_MODULES))
    if unknown:
        raise ValueError(f"layer entries {unknown} have no Hugging Face Llama name")
    for i in range(num_layers):
        for group, hf in _HF_MODULES.items():
            if group not in layers:
                raise ValueError(f"params['layers'] lacks {group!r}")
            module = f"model.layers.{i}.{hf}"
            if isinstance(layers[group], dict):
                linear(module, layers[group], i)
            else:
                groups.append([_plain(f"{module}.weight", layers[group], i, False)])
    if "lm_head" in params:
        linear("lm_head", params["lm_head"], None)
    if not methods:
        raise ValueError("nothing in the model is quantized; quantize it first (load_pretrained(quant=...), "
                         "--quant nf4|fp4|int8)")
    if len(methods) > 1:
        raise ValueError(f"the model mixes {sorted(methods)}; one bitsandbytes quantization_config describes one method")
    lm_head_quantized = "lm_head" in params and isinstance(params["lm_head"]["kernel"], quant.QuantizedTensor)
    return groups, methods.pop(), {"plain_linears": plain_linears, "first": first_q, "lm_head_quantized": lm_head_quantized}


def _header(entries: list[_Entry], metadata: dict) -> tuple[bytes, int]:
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, dtype, shape, _ in entries:
        if dtype not in _TAGS:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        n = _nbytes((name, dtype, shape, None))
        header[name] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, pos


def _write_shard(path: Path, entries: list[_Entry]) -> None:
    head, _ = _header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        for name, dtype, shape, value in entries:
            a = np.asarray(value())
            if a.dtype.name != dtype or tuple(a.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced {a.dtype} {a.shape}, header says {dtype} {shape}")
            f.write(np.ascontiguousarray(a).tobytes())


def _shards(groups: list[list[_Entry]], max_bytes: int) -> list[list[_Entry]]:
    """Pack groups into shards of at most ``max_bytes`` (a larger group gets a shard of its own)."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(_nbytes(e) for e in group)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    return shards


def _hf_config(model) -> dict:
    """config.json of the source checkpoint when there is one, else rebuilt from ours."""
    src = os.path.join(str(model.path), "config.json") if model.path else None
    if src and os.path.exists(src):
        with open(src) as f:
            cfg = json.load(f)
    else:
        c = model.config
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.model_type]
        cfg = {"architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
               "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
               "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
               "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
               "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
               "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias}  # fmt: skip
        if c.rope_scaling:
            cfg["rope_scaling"] = c.rope_scaling_dict
        if c.sliding_window:
            cfg["sliding_window"] = c.sliding_window
        if c.bos_token_id is not None:
            cfg["bos_token_id"] = c.bos_token_id
        if c.eos_token_id:
            cfg["eos_token_id"] = list(c.eos_token_id) if len(c.eos_token_id) > 1 else c.eos_token_id[0]
    cfg.pop("quantization_config", None)
    return cfg


def export_bnb_checkpoint(model, dst: PathLike, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` (a quantized :class:`~lowbit_jax.convert.load.LoadedModel`) to ``dst`` as
    transformers + bitsandbytes save it: safetensors shards, config.json with
    ``quantization_config``, tokenizer files copied from the source when present.

    ``transformers.AutoModelForCausalLM.from_pretrained(dst)`` then loads the same codes and
    scales (``Linear4bit`` / ``Linear8bitLt``) and computes the same logits. Linear layers we
    left unquantized are listed in ``llm_int8_skip_modules`` so transformers leaves them too.
    """
    groups, method, info = _groups(model.params, model.config.num_hidden_layers)
    entries = [e for g in groups for e in g]
    first = info["first"]
    cfg = _hf_config(model)
    plain_dtypes = {d for n, d, _, _ in entries if n.endswith(("norm.weight", "embed_tokens.weight"))}
    if len(plain_dtypes) == 1:
        dt = plain_dtypes.pop()
        cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = dt
    compute = model.quant.compute_dtype or model.compute_dtype
    # An explicit skip list replaces transformers' default (the LM head), so name the head too
    # whenever it is not quantized here -- including when it is tied to the embedding.
    skip = sorted(set(info["plain_linears"]) | ({"lm_head"} if not info["lm_head_quantized"] else set()))
    qc = bnb_quantization_config(
        load_in_4bit=method != "int8",
        quant_type=method if method != "int8" else "nf4",
        double_quant=bool(method != "int8" and first.double_quant),
        compute_dtype=compute,
        int8_threshold=float(model.int8_threshold),
        skip_modules=skip,
    )
    if method != "int8":
        qc["bnb_4bit_quant_storage"] = str(first.quant_storage)
    cfg["quantization_config"] = qc
    shards = _shards(groups, max_shard_bytes)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        if len(shards) == 1:
            _write_shard(tmp / "model.safetensors", shards[0])
        else:
            names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
            weight_map = {}
            total = 0
            for fname, shard in zip(names, shards):
                _write_shard(tmp / fname, shard)
                for e in shard:
                    weight_map[e[0]] = fname
                    total += _nbytes(e)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if model.path and os.path.isdir(str(model.path)):
            for fname in COPIED_FILES:
                src = os.path.join(str(model.path), fname)
                if os.path.exists(src):
                    shutil.copy(src, tmp / fname)
    return Path(dst)

