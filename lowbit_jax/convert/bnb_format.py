"""bitsandbytes-serialized state dicts in and out, without requantizing.

Transformers + bitsandbytes save a 4-bit ``Linear4bit`` as ``<m>.weight`` (packed uint8
``[n/2, 1]``), ``<m>.weight.absmax``, ``<m>.weight.quant_map`` and, when double quantized,
``<m>.weight.nested_absmax`` / ``<m>.weight.nested_quant_map``, plus
``<m>.weight.quant_state.bitsandbytes__<nf4|fp4>``: the non-tensor fields (shape, dtype,
blocksize, nested offset, ...) as JSON bytes in a uint8 tensor (``QuantState.as_dict(packed=True)``).
An 8-bit ``Linear8bitLt`` is ``<m>.weight`` (int8 ``CB``), ``<m>.SCB`` and ``<m>.weight_format``.
Our containers hold exactly these arrays, so import and export are re-labelling plus checks
that the file really is what it claims (code tables equal to ours, sizes consistent with the
shape), which is what makes the round trip bit-exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from lowbit_jax import formats
from lowbit_jax.convert.atomic import atomic_dir
from lowbit_jax.convert.safety import SAFETENSORS_DTYPES, CheckpointError, numpy_dtype, read_safetensors_checked
from lowbit_jax.quant import BLOCKSIZES_4BIT, Packed4bit, RowwiseInt8

__all__ = [
    "QUANT_STATE_PREFIX",
    "packed4bit_from_bnb",
    "packed4bit_to_bnb",
    "rowwise_int8_from_bnb",
    "rowwise_int8_to_bnb",
    "import_bnb_state_dict",
    "bnb_groups",
    "export_bnb_state_dict",
    "bnb_quantization_config",
    "save_bnb_checkpoint",
    "load_bnb_checkpoint",
]

PathLike = Union[str, os.PathLike]
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
_FLOAT_NAMES = ("float32", "bfloat16", "float16")
# bitsandbytes' Int8Params weight_format codes; only "row" (0) is the plain [out, in] layout.
_WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def _np(x) -> np.ndarray:
    """numpy view of a numpy/jax/torch tensor (torch is only touched if the caller passed its tensors)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: move the bits, reinterpret
            import torch  # already imported by the caller that made ``x``

            return t.view(torch.int16).numpy().copy().view(numpy_dtype("bfloat16"))
        # A copy: bitsandbytes may repack a layer's weight in place on its first CPU forward,
        # which must not reach into our arrays through shared memory.
        return t.numpy().copy()
    return np.asarray(x)


def _unpack_json(tensor, key: str) -> dict:
    raw = _np(tensor)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{key}: expected a 1-D uint8 tensor of JSON bytes, got {raw.dtype} {raw.shape}")
    try:
        d = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{key}: quant state is not UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{key}: quant state JSON must be an object, got {type(d).__name__}")
    return d


def _pack_json(d: dict) -> np.ndarray:
    # json.dumps with default separators, exactly as bitsandbytes.utils.pack_dict_to_tensor.
    return np.frombuffer(json.dumps(d).encode("utf-8"), dtype=np.uint8).copy()


def packed4bit_from_bnb(
    weight,
    absmax,
    quant_map,
    quant_state: Mapping[str, Any],
    nested_absmax=None,
    nested_quant_map=None,
    name: str = "weight",
) -> Packed4bit:
    """One bitsandbytes 4-bit weight -> :class:`Packed4bit` (same bytes, checked).

    ``quant_state`` is the unpacked JSON (``shape``, ``dtype``, ``blocksize``, ``quant_type``
    and, for double quant, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``).
    """
    qs = dict(quant_state)
    quant_type = qs.get("quant_type")
    if quant_type not in formats.QUANT_TYPES_4BIT:
        raise CheckpointError(f"{name}: quant_type must be one of {formats.QUANT_TYPES_4BIT}, got {quant_type!r}")
    shape = qs.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise CheckpointError(f"{name}: quant state shape must be a list of positive ints, got {shape!r}")
    shape = tuple(shape)
    dtype = qs.get("dtype")
    if dtype not in _FLOAT_NAMES:
        raise CheckpointError(f"{name}: quant state dtype must be one of {_FLOAT_NAMES}, got {dtype!r}")
    blocksize = qs.get("blocksize")
    if blocksize not in BLOCKSIZES_4BIT:
        raise CheckpointError(f"{name}: blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")
    n = int(np.prod(shape, dtype=np.int64))
    nbytes, nblocks = -(-n // 2), -(-n // blocksize)

    w = _np(weight)
    if w.nbytes != nbytes:
        raise CheckpointError(f"{name}: packed weight holds {w.nbytes} bytes; shape {shape} needs {nbytes}")
    # The codes are bytes whatever dtype they were stored as (bnb_4bit_quant_storage=bfloat16 is
    # FSDP's choice): kept as a float dtype, a bf16->f32->bf16 round trip on the way (XLA on the
    # CPU) would quiet NaN bit patterns and change codes. The bytes are identical either way.
    packed = np.ascontiguousarray(w).reshape(-1).view(np.uint8)
    code = _np(quant_map).astype(np.float32, copy=False).reshape(-1)
    if not np.array_equal(code, formats.get_4bit_code(quant_type)):
        raise CheckpointError(f"{name}: quant_map is not bitsandbytes' {quant_type} code table; custom codes unsupported")

    am = _np(absmax).reshape(-1)
    if am.shape[0] != nblocks:
        raise CheckpointError(f"{name}: absmax has {am.shape[0]} entries; {n} elements in blocks of {blocksize} need {nblocks}")
    nested = offset = None
    nested_blocksize = 256
    if nested_absmax is not None:
        if am.dtype != np.uint8:
            raise CheckpointError(f"{name}: double-quantized absmax must be uint8, got {am.dtype}")
        nested_blocksize = qs.get("nested_blocksize")
        if nested_blocksize not in BLOCKSIZES_4BIT:
            raise CheckpointError(f"{name}: nested_blocksize must be one of {BLOCKSIZES_4BIT}, got {nested_blocksize!r}")
        if qs.get("nested_dtype", "float32") != "float32":
            raise CheckpointError(f"{name}: nested_dtype must be float32, got {qs.get('nested_dtype')!r}")
        if not isinstance(qs.get("nested_offset"), (int, float)):
            raise CheckpointError(f"{name}: double quant needs a numeric nested_offset, got {qs.get('nested_offset')!r}")
        nested = _np(nested_absmax).astype(np.float32, copy=False).reshape(-1)
        if nested.shape[0] != -(-nblocks // nested_blocksize):
            raise CheckpointError(f"{name}: nested_absmax has {nested.shape[0]} entries, expected {-(-nblocks // nested_blocksize)}")
        nmap = None if nested_quant_map is None else _np(nested_quant_map).astype(np.float32).reshape(-1)
        if nmap is None or not np.array_equal(nmap, formats.dynamic_map(True)):
            raise CheckpointError(f"{name}: nested_quant_map is not the signed 8-bit dynamic map")
        # The JSON float is the exact double of a float32 offset (QuantState stores offset.item()).
        offset = np.float32(qs["nested_offset"])
    else:
        am = am.astype(np.float32, copy=False)
    return Packed4bit(
        packed=packed,
        absmax=am,
        nested_absmax=nested,
        offset=offset if offset is None else np.asarray(offset, np.float32),
        shape=shape,
        dtype=dtype,
        blocksize=int(blocksize),
        quant_type=quant_type,
        nested_blocksize=int(nested_blocksize),
        quant_storage="uint8",
    )


def packed4bit_to_bnb(q: Packed4bit, prefix: str = "weight") -> dict[str, np.ndarray]:
    """:class:`Packed4bit` -> the state-dict entries ``Linear4bit`` writes (keys under ``prefix``)."""
    if q.layout != "bnb":
        raise ValueError(f"{prefix}: export needs the canonical 'bnb' layout, got layout={q.layout!r} (use quant.to_flat)")
    packed = np.asarray(q.packed).reshape(-1)
    if q.quant_storage != "uint8":  # bitsandbytes' quant_storage: the same bytes, another dtype
        packed = packed.view(numpy_dtype(q.quant_storage))
    packed = packed.reshape(-1, 1)
    out = {
        prefix: packed,
        f"{prefix}.absmax": np.asarray(q.absmax),
        f"{prefix}.quant_map": np.asarray(q.code, np.float32),
    }
    qs: dict[str, Any] = {
        "quant_type": q.quant_type,
        "blocksize": int(q.blocksize),
        "dtype": str(q.dtype),
        "shape": list(q.shape),
    }
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = np.asarray(q.nested_absmax, np.float32)
        out[f"{prefix}.nested_quant_map"] = np.asarray(q.nested_code, np.float32)
        qs.update(
            {
                "nested_blocksize": int(q.nested_blocksize),
                "nested_dtype": "float32",
                "nested_offset": float(np.asarray(q.offset, np.float32)),
            }
        )
    out[f"{prefix}.{QUANT_STATE_PREFIX}{q.quant_type}"] = _pack_json(qs)
    return out


def rowwise_int8_from_bnb(weight, scb, weight_format=None, dtype: str = "float16", name: str = "weight") -> RowwiseInt8:
    """One ``Linear8bitLt`` weight (``CB`` int8 [out, in] + ``SCB``) -> :class:`RowwiseInt8`."""
    cb = _np(weight)
    if cb.dtype != np.int8 or cb.ndim != 2:
        raise CheckpointError(f"{name}: 8-bit weight must be 2-D int8, got {cb.dtype} {cb.shape}")
    s = _np(scb).astype(np.float32, copy=False).reshape(-1)
    if s.shape[0] != cb.shape[0]:
        raise CheckpointError(f"{name}: SCB has {s.shape[0]} entries for {cb.shape[0]} rows")
    if weight_format is not None:
        wf = _np(weight_format)
        fmt = int(wf.reshape(-1)[0]) if wf.dtype.kind in "iu" else wf
        if fmt != 0:
            raise CheckpointError(
                f"{name}: weight_format {_WEIGHT_FORMATS.get(fmt, fmt)!r} is a GPU-tiled layout; only 'row' is supported"
            )
    if dtype not in _FLOAT_NAMES:
        raise ValueError(f"dtype must be one of {_FLOAT_NAMES}, got {dtype!r}")
    return RowwiseInt8(codes=cb, row_absmax=s, shape=tuple(cb.shape), dtype=dtype)


def rowwise_int8_to_bnb(q: RowwiseInt8, prefix: str = "") -> dict[str, np.ndarray]:
    """:class:`RowwiseInt8` -> ``{prefix}weight``, ``{prefix}SCB``, ``{prefix}weight_format``."""
    return {
        f"{prefix}weight": np.asarray(q.codes, np.int8),
        f"{prefix}SCB": np.asarray(q.row_absmax, np.float32),
        f"{prefix}weight_format": np.asarray(0, np.uint8),
    }


def import_bnb_state_dict(state_dict: Mapping[str, Any], int8_dtype: str = "float16") -> dict[str, Any]:
    """A bitsandbytes-serialized state dict -> ``{name: Packed4bit | RowwiseInt8 | np.ndarray}``.

    Quantized weights keep their parameter name (``...q_proj.weight``); their auxiliary keys are
    consumed. Everything else (biases, norms, embeddings) passes through as numpy arrays.
    ``int8_dtype`` is the compute dtype recorded on 8-bit weights (bitsandbytes does not store it).
    """
    sd = dict(state_dict)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for key in sorted(sd):
        head, sep, qt = key.rpartition("." + QUANT_STATE_PREFIX)
        if not sep:
            continue
        if head not in sd:
            raise CheckpointError(f"{key}: quant state without its weight {head!r}")
        qs = _unpack_json(sd[key], key)
        if qs.get("quant_type", qt) != qt:
            raise CheckpointError(f"{key}: key says {qt!r} but the quant state says {qs.get('quant_type')!r}")
        qs.setdefault("quant_type", qt)
        aux = {s: sd.get(f"{head}.{s}") for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")}
        for s in ("absmax", "quant_map"):
            if aux[s] is None:
                raise CheckpointError(f"{head}: 4-bit weight without {head}.{s}")
        out[head] = packed4bit_from_bnb(sd[head], quant_state=qs, name=head, **aux)
        used |= {key, head} | {f"{head}.{s}" for s, v in aux.items() if v is not None}
    for key in sorted(sd):
        if not key.endswith("SCB") or key in used:
            continue
        prefix = key[: -len("SCB")]
        wkey = prefix + "weight"
        if wkey not in sd:
            raise CheckpointError(f"{key}: SCB without its weight {wkey!r}")
        fkey = prefix + "weight_format"
        out[wkey] = rowwise_int8_from_bnb(sd[wkey], sd[key], sd.get(fkey), dtype=int8_dtype, name=wkey)
        used |= {key, wkey, fkey}
    for key, value in sd.items():
        if key not in used:
            if key.endswith(".weight_format") or "." + QUANT_STATE_PREFIX in key:
                raise CheckpointError(f"{key}: quantization metadata without a matching weight")
            out[key] = _np(value)
    return out


_AUX_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def bnb_groups(names) -> dict[str, list[str]]:
    """Quantized weight name -> its state-dict entries, for every bitsandbytes weight in ``names``.

    4-bit: ``[weight, weight.quant_state.bitsandbytes__*, weight.absmax, ...]``; 8-bit:
    ``[weight, SCB, weight_format?]``. Lets a streaming loader read one weight's entries
    together without loading the whole state dict.
    """
    present = set(names)
    groups: dict[str, list[str]] = {}
    for key in sorted(present):
        head, sep, _ = key.rpartition("." + QUANT_STATE_PREFIX)
        if sep:
            if head in groups:
                raise CheckpointError(f"{head}: more than one quant state")
            groups[head] = [head, key] + [f"{head}.{s}" for s in _AUX_4BIT if f"{head}.{s}" in present]
        elif key.endswith("SCB") and (key == "SCB" or key.endswith(".SCB")):
            prefix = key[: -len("SCB")]
            head = prefix + "weight"
            groups[head] = [head, key] + ([prefix + "weight_format"] if prefix + "weight_format" in present else [])
    for head, members in groups.items():
        if head not in present:
            raise CheckpointError(f"{members[1]}: quantization state without its weight {head!r}")
    return groups


def export_bnb_state_dict(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{name: Packed4bit | RowwiseInt8 | array}`` -> the state dict transformers + bitsandbytes write.

    Names are PyTorch parameter names ending in ``.weight`` for quantized entries.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in tree.items():
        if isinstance(value, Packed4bit):
            out.update(packed4bit_to_bnb(value, prefix=name))
        elif isinstance(value, RowwiseInt8):
            if not name.endswith("weight"):
                raise ValueError(f"{name}: an 8-bit weight must be named '<module>.weight'")
            out.update(rowwise_int8_to_bnb(value, prefix=name[: -len("weight")]))
        else:
            out[name] = np.asarray(value)
    return out


def bnb_quantization_config(
    load_in_4bit: bool = True,
    quant_type: str = "nf4",
    double_quant: bool = False,
    compute_dtype: str = "bfloat16",
    int8_threshold: float = 6.0,
    skip_modules: Optional[list] = None,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json that transformers' BitsAndBytesConfig reads."""
    if quant_type not in formats.QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES_4BIT}, got {quant_type!r}")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": bool(load_in_4bit),
        "_load_in_8bit": not load_in_4bit,
        "load_in_4bit": bool(load_in_4bit),
        "load_in_8bit": not load_in_4bit,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": float(int8_threshold),
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _to_safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> tuple[bytes, list]:
    tags = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, pos = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.name not in tags:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        b = a.tobytes()
        header[name] = {"dtype": tags[a.dtype.name], "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        chunks.append(b)
        pos += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb, chunks


def save_bnb_checkpoint(
    out_dir: PathLike,
    tree: Mapping[str, Any],
    config: Optional[Mapping[str, Any]] = None,
    quantization_config: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model.safetensors`` (+ ``config.json``) in bitsandbytes' format, atomically.

    The directory appears under ``out_dir`` only once every file is complete.
    """
    sd = export_bnb_state_dict(tree)
    head, chunks = _to_safetensors_bytes(sd, {"format": "pt"})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(head)
            for c in chunks:
                f.write(c)
        if config is not None or quantization_config is not None:
            cfg = dict(config or {})
            if quantization_config is not None:
                cfg["quantization_config"] = dict(quantization_config)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return Path(out_dir)


def load_bnb_checkpoint(path: PathLike, int8_dtype: str = "float16") -> dict[str, Any]:
    """Read a bitsandbytes-format ``.safetensors`` file (or a directory holding ``model.safetensors``
    or ``model-*.safetensors`` shards), validated, into our containers."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors under {path}")
    sd: dict[str, Any] = {}
    for f in files:
        sd.update(read_safetensors_checked(f))
    return import_bnb_state_dict(sd, int8_dtype=int8_dtype)
