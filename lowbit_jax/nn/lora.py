"""LoRA / QLoRA on Linen params trees: PEFT's semantics, JAX's functional style.

LoRA weights live next to the kernel they adapt, in the same module dict
(``{'kernel', 'bias', 'lora_A', 'lora_B'}``), Flax layout: ``lora_A [in, r]`` (random,
PEFT's kaiming-uniform bound 1/sqrt(in)), ``lora_B [r, out]`` (zeros), so the adapted layer
starts equal to the base. Training differentiates only the LoRA subtree: split it off with
``split_trainable`` (the frozen tree holds uint8 codes, which ``jax.grad`` cannot take) and
``combine`` them inside the loss. The NNX side (``lowbit_jax.nn.nnx``) shares the config and
the numerics here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import quant
from lowbit_jax.nn.quantize import iter_linears

LORA_KEYS = ("lora_A", "lora_B")
_NORM_HINTS = ("norm", "ln_", "ln", "layernorm", "rmsnorm")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's LoraConfig, same field names: ``r``, ``lora_alpha`` (scale = lora_alpha / r),
    ``lora_dropout`` on the LoRA input,
    ``target_modules``: a list of module names (a layer matches when its path equals a name or
    ends with "/name"), or one string taken as a regex that must match the full path.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[str, Sequence[str]] = ("q_proj", "v_proj")

    def __post_init__(self):
        if not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("LoraConfig.target_modules must name at least one module")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha)

    @property
    def dropout(self) -> float:
        return float(self.lora_dropout)

    @property
    def scale(self) -> float:
        return float(self.lora_alpha) / float(self.r)

    def matches(self, path: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == t or path.endswith("/" + t) for t in self.target_modules)


def init_lora_weights(key, in_features: int, out_features: int, r: int, dtype=jnp.float32):
    """(A [in, r] uniform in +-1/sqrt(in) as PEFT's kaiming_uniform(a=sqrt(5)), B [r, out] zeros)."""
    bound = 1.0 / np.sqrt(in_features)
    a = jax.random.uniform(key, (in_features, r), jnp.float32, -bound, bound).astype(dtype)
    return a, jnp.zeros((r, out_features), dtype)


def lora_delta(x, a, b, scale: float, *, dropout: float = 0.0, rng=None):
    """``scale * dropout(x) @ A @ B`` in float32 (the adapter's contribution to the output)."""
    x = x.astype(jnp.float32)
    if dropout > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    return (x @ a.astype(jnp.float32)) @ b.astype(jnp.float32) * scale


def delta_weight(a, b, scale: float):
    """The merged update in Flax layout ``[in, out]``, float32."""
    return a.astype(jnp.float32) @ b.astype(jnp.float32) * scale


def _kernel_shape_in_out(k) -> tuple[int, int]:
    if isinstance(k, quant.QuantizedTensor):
        out_f, in_f = k.shape
        return in_f, out_f
    return tuple(k.shape)


def _copy(tree):
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def add_lora(params, config: LoraConfig, key, dtype=jnp.float32):
    """A new params tree with ``lora_A``/``lora_B`` beside every targeted kernel."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"config must be a LoraConfig, got {type(config).__name__}")
    out = _copy(params)
    targets = [(p, layer) for p, layer in iter_linears(out) if config.matches(p)]
    if not targets:
        paths = [p for p, _ in iter_linears(out)]
        raise ValueError(f"target_modules {config.target_modules!r} matched none of the linear layers {paths}")
    for i, (_, layer) in enumerate(targets):
        in_f, out_f = _kernel_shape_in_out(layer["kernel"])
        layer["lora_A"], layer["lora_B"] = init_lora_weights(jax.random.fold_in(key, i), in_f, out_f, config.r, dtype)
    return out


def _is_lora_key(path) -> bool:
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    return name in LORA_KEYS


def trainable_mask(params):
    """A bool tree (True on LoRA leaves) for ``optax.masked`` over a combined tree."""
    is_q = lambda x: isinstance(x, quant.QuantizedTensor)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda p, _: _is_lora_key(p), params, is_leaf=is_q)


def split_trainable(params):
    """``(trainable, frozen)``: the LoRA leaves and everything else, as two nested dicts."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a nested dict, got {type(params).__name__}")
    trainable, frozen = {}, {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            t, f = split_trainable(v)
            if t:
                trainable[k] = t
            if f or not t:
                frozen[k] = f
        elif k in LORA_KEYS:
            trainable[k] = v
        else:
            frozen[k] = v
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of ``split_trainable``."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = combine(v, frozen.get(k, {})) if isinstance(v, Mapping) else v
    return out


def _count(x) -> int:
    if isinstance(x, quant.QuantizedTensor):
        return x.size
    return int(np.prod(np.shape(x), dtype=np.int64))


def count_parameters(params) -> tuple[int, int]:
    """(trainable, all) parameter counts; a quantized weight counts its logical elements."""
    is_q = lambda x: isinstance(x, quant.QuantizedTensor)  # noqa: E731
    trainable = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]:
        n = _count(leaf)
        total += n
        if _is_lora_key(path):
            trainable += n
    return trainable, total


def print_trainable_parameters(model_or_params) -> tuple[int, int]:
    """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    try:
        from flax import nnx

        if isinstance(model_or_params, nnx.Module):
            trainable = sum(_count(v) for v in jax.tree.leaves(nnx.state(model_or_params, nnx.LoRAParam)))
            total = sum(
                _count(v)
                for v in jax.tree.leaves(
                    nnx.state(model_or_params).to_pure_dict(), is_leaf=lambda x: isinstance(x, quant.QuantizedTensor)
                )
            )
            print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
            return trainable, total
    except ImportError:  # pragma: no cover
        pass
    trainable, total = count_parameters(model_or_params)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def requantize_like(w_out_in, like):
    """Quantize ``w_out_in`` with the same format and settings as the tensor ``like``."""
    if isinstance(like, quant.Packed4bit):
        return quant.quantize_4bit(
            w_out_in,
            blocksize=like.blocksize,
            quant_type=like.quant_type,
            compress_statistics=like.double_quant,
            quant_storage=like.quant_storage,
        )
    if isinstance(like, quant.RowwiseInt8):
        return quant.quantize_int8(w_out_in)
    raise ValueError(f"cannot requantize like a {type(like).__name__}")


def merge_lora(params, config: LoraConfig, *, requantize: bool = False, dtype=jnp.bfloat16):
    """PEFT's merge_and_unload: ``W + scale * A @ B`` into each adapted kernel, LoRA removed.

    A quantized kernel is dequantized and merged into ``dtype`` (bf16 by default), or with
    ``requantize=True`` quantized again in its original format. Float kernels keep their dtype.
    """
    out = _copy(params)
    for _, layer in iter_linears(out):
        if "lora_A" not in layer:
            continue
        a, b = layer.pop("lora_A"), layer.pop("lora_B")
        k = layer["kernel"]
        dw = delta_weight(a, b, config.scale)
        if isinstance(k, quant.QuantizedTensor):
            merged = quant.dequantize(k, jnp.float32).T + dw
            layer["kernel"] = requantize_like(merged.T.astype(k.dtype), k) if requantize else merged.astype(dtype)
        else:
            layer["kernel"] = (k.astype(jnp.float32) + dw).astype(k.dtype)
    return out


def unmerge_lora(merged, lora_params, config: LoraConfig):
    """Undo ``merge_lora``: subtract each adapter from its kernel and put ``lora_A/B`` back.

    ``lora_params`` is the trainable tree of ``split_trainable`` from before the merge. A
    quantized kernel is dequantized, unmerged and quantized again in its format.
    """
    out = combine(lora_params, _copy(merged))
    for _, layer in iter_linears(out):
        if "lora_A" not in layer:
            continue
        k = layer["kernel"]
        dw = delta_weight(layer["lora_A"], layer["lora_B"], config.scale)
        if isinstance(k, quant.QuantizedTensor):
            w = quant.dequantize(k, jnp.float32).T - dw
            layer["kernel"] = requantize_like(w.T.astype(k.dtype), k)
        else:
            layer["kernel"] = (k.astype(jnp.float32) - dw).astype(k.dtype)
    return out


def _is_norm_path(names: Sequence[str]) -> bool:
    low = [n.lower() for n in names]
    return any(any(h in n for h in _NORM_HINTS) for n in low[:-1]) or (low and low[-1] == "scale")


def prepare_for_kbit_training(params):
    """PEFT's ``prepare_model_for_kbit_training`` for a Linen tree: norm parameters and LoRA
    weights to float32 (they are what training updates and what overflows in bf16); quantized
    kernels untouched. Compute dtype comes from QuantConfig.compute_dtype; wrap the loss in
    ``jax.checkpoint`` (or use ``nn.remat``) for gradient checkpointing.
    """
    is_q = lambda x: isinstance(x, quant.QuantizedTensor)  # noqa: E731

    def cast(path, leaf):
        if is_q(leaf) or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if (names and names[-1] in LORA_KEYS) or _is_norm_path(names):
            return leaf.astype(jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=is_q)
