"""Validation of untrusted checkpoint files before a single tensor byte is trusted.

Checkpoints come from the internet. A safetensors header is attacker-controlled JSON: it can
declare offsets past the end of the file, sizes that disagree with the dtype, overlapping
ranges, or shapes whose product overflows or asks for terabytes. Each such lie must become a
clear ``ValueError`` naming the file and tensor -- never a segfault, a silent wrong read, or an
allocation the size of the declared shape. The helpers here check everything from the header
and the file size alone, so nothing is allocated or written before the file is known good.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

__all__ = [
    "CheckpointError",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "validate_safetensors",
    "read_safetensors_checked",
    "check_zip",
    "check_shapes",
    "expected_llama_shapes",
    "warn_nonfinite",
    "count_nonfinite",
    "safe_member_name",
]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, lying about its contents, or unsafe to load."""


# safetensors dtype tag -> (numpy dtype name, bytes per element). bfloat16/float8 via ml_dtypes.
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "U16": ("uint16", 2),
    "I16": ("int16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "U32": ("uint32", 4),
    "I32": ("int32", 4),
    "F32": ("float32", 4),
    "U64": ("uint64", 8),
    "I64": ("int64", 8),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
# The safetensors library itself caps the header at 100 MB; a larger one is an attack.
MAX_HEADER_BYTES = 100_000_000
# No single tensor of any released model comes near 2**40 elements; a header declaring one is lying.
MAX_TENSOR_ELEMENTS = 1 << 40
# torch.save never compresses; a member that inflates by more than this is built to exhaust the
# machine (checking its CRC alone would decompress all of it).
MAX_ZIP_RATIO = 1024


def numpy_dtype(name: str) -> np.dtype:
    """A numpy dtype by name, with bfloat16/float8 from ml_dtypes (a JAX dependency)."""
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _shape_elements(shape: Any, where: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{where}: shape has a negative dimension: {shape}")
    n = math.prod(shape)  # exact Python ints: no overflow to hide a huge shape
    if n > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{where}: declared shape {shape} has {n} elements, over the {MAX_TENSOR_ELEMENTS} limit")
    return n


def validate_safetensors(path: PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Check a ``.safetensors`` file against its own header without reading any tensor.

    Returns ``(tensors, metadata, data_start)`` where ``tensors`` maps name -> {"dtype",
    "shape", "data_offsets"} with offsets relative to ``data_start``. Raises
    :class:`CheckpointError` for: a file shorter than its header, a header that is not a
    JSON object, unknown dtypes, malformed or huge shapes, byte ranges whose length disagrees
    with shape x dtype size, ranges past the end of the file, and overlapping ranges.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header declares {header_len} bytes but the file has only {size - 8} after the "
                "length prefix (truncated file?)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = size - data_start
    ranges = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape, data_offsets; got {info!r}")
        dtype = info["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        n = _shape_elements(info["shape"], where)
        offs = info["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] integers, got {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where}: data_offsets {offs} are not 0 <= begin <= end")
        expected = n * SAFETENSORS_DTYPES[dtype][1]
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: byte range {offs} holds {end - begin} bytes but shape {info['shape']} of {dtype} "
                f"needs {expected}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{where}: data_offsets {offs} run past the end of the data ({data_len} bytes; truncated file?)"
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} {[b0, e0]} and {n1!r} {[b1, e1]} overlap")
    return header, metadata, data_start


def read_safetensors_checked(path: PathLike, names: Optional[list] = None, mmap: bool = True) -> dict[str, np.ndarray]:
    """Validate, then read tensors as numpy arrays (memory-mapped, read-only, by default)."""
    header, _, data_start = validate_safetensors(path)
    if names is None:
        names = list(header)
    missing = [n for n in names if n not in header]
    if missing:
        raise KeyError(f"{path}: no tensors named {missing}")
    out = {}
    mm = None
    if mmap and Path(path).stat().st_size > data_start:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name in names:
        info = header[name]
        dt = numpy_dtype(SAFETENSORS_DTYPES[info["dtype"]][0])
        begin, end = info["data_offsets"]
        if mm is not None:
            buf = mm[data_start + begin : data_start + end]
        else:
            with open(path, "rb") as f:
                f.seek(data_start + begin)
                buf = np.frombuffer(f.read(end - begin), np.uint8)
        out[name] = buf.view(dt).reshape(info["shape"])
    return out


def check_zip(path: PathLike) -> zipfile.ZipFile:
    """Open a zip archive after checking it is complete and every member's CRC matches.

    A truncated download loses the central directory (``BadZipFile``); a corrupted one fails a
    CRC. Either becomes a :class:`CheckpointError`. Returns the open ``ZipFile``.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: not a readable zip archive (truncated or corrupt): {e}") from None
    try:
        for info in zf.infolist():
            if info.file_size > MAX_TENSOR_ELEMENTS:
                raise CheckpointError(f"{path}: member {info.filename!r} declares {info.file_size} bytes")
            if info.flag_bits & 0x1:
                raise CheckpointError(f"{path}: member {info.filename!r} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1024):
                raise CheckpointError(
                    f"{path}: member {info.filename!r} inflates {info.compress_size} bytes to {info.file_size} "
                    f"(over {MAX_ZIP_RATIO}x: a zip bomb?); torch.save stores tensors uncompressed"
                )
        bad = zf.testzip()
    except CheckpointError:
        zf.close()
        raise
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as e:
        zf.close()
        raise CheckpointError(f"{path}: zip archive is corrupt or truncated: {e}") from None
    if bad is not None:
        zf.close()
        raise CheckpointError(f"{path}: zip member {bad!r} fails its CRC check (corrupt file)")
    return zf


def safe_member_name(name: Any, where: str) -> str:
    """A file name from an index (``weight_map``) that stays inside the checkpoint directory.

    An index is as untrusted as the shards: ``"../../.ssh/id_rsa"`` or an absolute path must not
    make the loader open a file elsewhere.
    """
    bad = not isinstance(name, str) or not name or "\0" in name or "\\" in name
    if not bad:
        norm = os.path.normpath(name)
        bad = os.path.isabs(name) or norm in (".", "..") or norm.startswith(".." + os.sep)
    if bad:
        raise CheckpointError(f"{where}: shard name {name!r} is not a file inside the checkpoint directory")
    return name


def expected_llama_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The weight shapes a Llama-family ``config.json`` implies, in PyTorch ``[out, in]`` order."""
    try:
        h = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
    except KeyError as e:
        raise ValueError(f"config is missing {e.args[0]!r}, needed to check weight shapes") from None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (heads * head_dim, h),
                p + "self_attn.k_proj.weight": (kv * head_dim, h),
                p + "self_attn.v_proj.weight": (kv * head_dim, h),
                p + "self_attn.o_proj.weight": (h, heads * head_dim),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if config.get("attention_bias", config.get("model_type") == "qwen2"):
            shapes.update({p + "self_attn.q_proj.bias": (heads * head_dim,), p + "self_attn.k_proj.bias": (kv * head_dim,),
                           p + "self_attn.v_proj.bias": (kv * head_dim,)})
    return shapes


def check_shapes(
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    allow_missing: bool = False,
    allow_extra: bool = True,
) -> None:
    """Raise one ``ValueError`` listing every tensor whose shape disagrees with the config.

    ``actual`` maps names to logical shapes (for quantized tensors: the original shape, not the
    packed one). Missing tensors are an error unless ``allow_missing``; names the config does
    not know are an error only when ``allow_extra`` is False.
    """
    problems = []
    for name, shape in expected.items():
        if name not in actual:
            if not allow_missing:
                problems.append(f"{name}: missing (config expects {tuple(shape)})")
        elif tuple(actual[name]) != tuple(shape):
            problems.append(f"{name}: shape {tuple(actual[name])}, config expects {tuple(shape)}")
    if not allow_extra:
        problems += [f"{name}: not expected by the config" for name in actual if name not in expected]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint does not match its config ({len(problems)} problems):\n  {shown}{more}")


# dtype name -> (unsigned view, |x| bit mask, exponent-all-ones): x is NaN or Inf iff |x| bits >= the
# exponent mask (NaN iff >). Integer compares on a view are ~5x faster than isnan/isinf, and need
# no float32 copy of a bfloat16 tensor, so every tensor of a large checkpoint can be checked.
_NONFINITE_BITS = {
    "float16": (np.uint16, 0x7FFF, 0x7C00),
    "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
    "float32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
    "float64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
    "float8_e5m2": (np.uint8, 0x7F, 0x7C),
    "float8_e4m3fn": (np.uint8, 0x7F, 0x7F),  # no Inf: 0x7F is its only NaN
}
_CHUNK = 1 << 16  # cache-sized: mask + max stay in L2 (~3 GB/s on one core)


def count_nonfinite(array) -> tuple[int, int]:
    """``(nan, inf)`` counts of a float array (zeros for other dtypes), a chunk at a time."""
    a = np.asarray(array)
    bits = _NONFINITE_BITS.get(a.dtype.name)
    if bits is None:
        return 0, 0
    view_t, abs_mask, exp_mask = bits
    flat = np.ascontiguousarray(a).reshape(-1).view(view_t)
    nan = inf = 0
    for i in range(0, flat.size, _CHUNK):
        ab = flat[i : i + _CHUNK] & view_t(abs_mask)
        if ab.max() >= view_t(exp_mask):
            if a.dtype.name == "float8_e4m3fn":
                nan += int(np.count_nonzero(ab == view_t(exp_mask)))
            else:
                nan += int(np.count_nonzero(ab > view_t(exp_mask)))
                inf += int(np.count_nonzero(ab == view_t(exp_mask)))
    return nan, inf


def warn_nonfinite(name: str, array) -> int:
    """Warn (naming the tensor) if a float array holds NaN or Inf; return how many it holds.

    Quantization stays defined on such tensors (the block absmax becomes NaN/Inf and only that
    block's values are lost), so this warns rather than refusing.
    """
    nan, inf = count_nonfinite(array)
    if nan or inf:
        warnings.warn(f"tensor {name!r} has {nan} NaN and {inf} Inf values", RuntimeWarning, stacklevel=2)
    return nan + inf
