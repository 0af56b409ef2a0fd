"""Every checkpoint directory ``load_pretrained`` accepts, as one validated stream of named tensors.

Hugging Face checkpoints come as safetensors or as PyTorch ``.bin`` zips, each single or sharded
behind an index, and their tensors are either plain or bitsandbytes-serialized (a quantized
weight plus auxiliary keys). All of it is untrusted input, so :class:`CheckpointReader` checks
every file from its own header (or zip directory and pickle) before a byte of tensor data is
used, and learns every tensor's dtype and shape up front. :func:`iter_model_tensors` then checks
those shapes against ``config.json`` -- a mismatch is one error listing the tensors, not a crash
deep in the model -- and hands out one tensor at a time (memory-mapped), with bitsandbytes
weights re-assembled into our containers and every float tensor scanned for NaN/Inf.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np

from lowbit_jax import quant
from lowbit_jax.convert import bnb_format
from lowbit_jax.convert.safety import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    check_shapes,
    expected_llama_shapes,
    numpy_dtype,
    safe_member_name,
    validate_safetensors,
    warn_nonfinite,
)
from lowbit_jax.convert.torch_bin import TorchBinReader

__all__ = ["CheckpointReader", "TensorInfo", "iter_model_tensors", "prequantized_config"]

PathLike = Union[str, os.PathLike]
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Pickles a Trainer leaves beside the weights; never model tensors.
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _read_index(path: Path, index: str) -> dict[str, str]:
    """``weight_map`` of an index file: tensor name -> shard file (checked to stay in ``path``)."""
    where = str(path / index)
    try:
        with open(path / index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{where}: not a valid index ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where} has no weight_map")
    out = {}
    for name, shard in weight_map.items():
        out[str(name)] = str(path / safe_member_name(shard, where))
    missing = sorted({os.path.basename(f) for f in out.values() if not os.path.isfile(f)})
    if missing:
        raise FileNotFoundError(f"{where} names shard(s) that are missing: {', '.join(missing)}")
    return out


def _model_files(path: Path) -> tuple[str, list[str], Optional[dict[str, str]]]:
    """(format, files, weight_map or None) of a checkpoint directory; safetensors preferred."""
    if (path / SAFETENSORS_INDEX).exists():
        wm = _read_index(path, SAFETENSORS_INDEX)
        return "safetensors", sorted(set(wm.values())), wm
    if (path / SAFETENSORS_SINGLE).exists():
        return "safetensors", [str(path / SAFETENSORS_SINGLE)], None
    st = sorted(str(p) for p in path.glob("*.safetensors"))
    if st:
        return "safetensors", st, None
    if (path / BIN_INDEX).exists():
        wm = _read_index(path, BIN_INDEX)
        return "torch", sorted(set(wm.values())), wm
    if (path / BIN_SINGLE).exists():
        return "torch", [str(path / BIN_SINGLE)], None
    bins = sorted(str(p) for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext)
                  if not p.name.startswith(_NOT_WEIGHTS))  # fmt: skip
    if bins:
        return "torch", bins, None
    raise FileNotFoundError(
        f"no model weights in {str(path)!r}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} "
        f"or {BIN_INDEX}"
    )


class CheckpointReader:
    """The tensors of a checkpoint directory (safetensors or torch zip, single or sharded).

    Construction validates every file and records each tensor's :class:`TensorInfo`; nothing
    else is read. :meth:`read` returns one tensor. ``names`` lists tensors file by file, in storage order, so reading in that order
    streams through each file once. Use as a context manager (torch zips stay open).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(self.path)!r} does not exist")
        self.format, self.files, weight_map = _model_files(self.path)
        self.infos: dict[str, TensorInfo] = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        self._maps: dict[str, np.memmap] = {}
        self._bins: dict[str, TorchBinReader] = {}
        try:
            for file in self.files:
                self._scan(file)
        except BaseException:
            self.close()
            raise
        if weight_map is not None:
            wrong = [f"{n!r} (index: {os.path.basename(f)})" for n, f in weight_map.items()
                     if n not in self.infos or self.infos[n].file != f]  # fmt: skip
            if wrong:
                raise CheckpointError(f"{self.path}: the index names tensors its shards do not hold: {', '.join(wrong[:10])}")

    def _add(self, name: str, info: TensorInfo) -> None:
        if name in self.infos:
            raise CheckpointError(f"tensor {name!r} appears in both {self.infos[name].file} and {info.file}")
        self.infos[name] = info

    def _scan(self, file: str) -> None:
        if self.format == "safetensors":
            header, _, data_start = validate_safetensors(file)
            self._headers[file] = (header, data_start)
            for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
                info = header[name]
                dtype = numpy_dtype(SAFETENSORS_DTYPES[info["dtype"]][0])
                self._add(name, TensorInfo(file, dtype, tuple(info["shape"])))
        else:
            reader = TorchBinReader(file)
            self._bins[file] = reader
            for name, ref in reader.tensors.items():
                self._add(name, TensorInfo(file, ref.dtype, ref.shape))

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str, copy: bool = True) -> np.ndarray:
        """One tensor, read-only. ``copy=False`` returns a view of the memory-mapped file instead
        of a copy in memory: cheaper, but JAX on the CPU then aliases the file (no copy for
        read-only arrays), so rewriting the file in place would change -- or, truncated, crash --
        a model loaded from it. The loader therefore copies, one tensor at a time."""
        a = self._read(name)
        if copy and not a.flags.owndata:
            a = np.array(a)
            a.flags.writeable = False  # immutable: JAX may adopt this buffer instead of copying again
        return a

    def _read(self, name: str) -> np.ndarray:
        if name not in self.infos:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {str(self.path)!r}")
        info = self.infos[name]
        if self.format == "torch":
            return self._bins[info.file].read(name)
        header, data_start = self._headers[info.file]
        begin, end = header[name]["data_offsets"]
        if begin == end:
            return np.zeros(info.shape, info.dtype)
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, np.uint8, "r")
        buf = self._maps[info.file][data_start + begin : data_start + end]
        if len(buf) != end - begin:  # the file shrank after validation
            raise CheckpointError(f"{info.file}: tensor {name!r} is truncated (file changed while loading?)")
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for r in self._bins.values():
            r.close()
        self._bins.clear()
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _quant_state(reader: CheckpointReader, name: str) -> dict:
    return bnb_format._unpack_json(reader.read(name), name)


def prequantized_config(reader: CheckpointReader, hf_config: Mapping[str, Any], compute_dtype: str):
    """The :class:`QuantConfig` a bitsandbytes-serialized checkpoint was saved with, or None.

    The tensors decide (their quant states are self-describing); ``quantization_config`` in
    config.json supplies what they do not record: the int8 outlier threshold and skip list.
    """
    from lowbit_jax.nn.config import DEFAULT_SKIP_MODULES, QuantConfig

    groups = bnb_format.bnb_groups(reader.names)
    if not groups:
        qc = hf_config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
            raise ValueError(
                f"config.json's quantization_config is {qc.get('quant_method')!r}; lowbit-jax reads unquantized "
                "and bitsandbytes-quantized checkpoints"
            )
        return None
    states = [g for g in groups.values() if bnb_format.QUANT_STATE_PREFIX in g[1]]
    four = [_quant_state(reader, g[1]) for g in states[:1]]
    if four and len(states) != len(groups):
        raise CheckpointError(f"{reader.path}: the checkpoint mixes 4-bit and 8-bit bitsandbytes weights")
    qc = hf_config.get("quantization_config") or {}
    skip = qc.get("llm_int8_skip_modules") or DEFAULT_SKIP_MODULES
    common = dict(compute_dtype=compute_dtype, int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
                  skip_modules=tuple(skip), min_size=0)  # fmt: skip
    if four:
        qs = four[0]
        return QuantConfig(load_in_4bit=True, quant_type=qs.get("quant_type", "nf4"),
                           double_quant="nested_blocksize" in qs, blocksize=int(qs.get("blocksize", 64)), **common)  # fmt: skip
    return QuantConfig(load_in_4bit=False, load_in_8bit=True, **common)


def _logical_shapes(reader: CheckpointReader, groups: dict[str, list[str]]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> the shape the model sees (a 4-bit weight's is in its quant state)."""
    aux = {n for g in groups.values() for n in g[1:]}
    shapes = {n: i.shape for n, i in reader.infos.items() if n not in aux}
    for head, members in groups.items():
        if bnb_format.QUANT_STATE_PREFIX in members[1]:
            shape = _quant_state(reader, members[1]).get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise CheckpointError(f"{members[1]}: quant state shape must be a list of ints, got {shape!r}")
            shapes[head] = tuple(shape)
    return shapes


def iter_model_tensors(
    reader: CheckpointReader, hf_config: Mapping[str, Any], int8_dtype: str = "float16"
) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, value)`` for a Llama-family checkpoint, one tensor at a time.

    ``value`` is a numpy array, or a :class:`~lowbit_jax.quant.Packed4bit` /
    :class:`~lowbit_jax.quant.RowwiseInt8` for a bitsandbytes-serialized weight (its auxiliary
    keys are consumed, nothing is requantized). Before anything is yielded every shape is
    checked against ``hf_config``; every float tensor read is checked for NaN/Inf (a warning
    naming it: quantization stays defined, only the affected blocks are lost).
    """
    groups = bnb_format.bnb_groups(reader.names)
    check_shapes(_logical_shapes(reader, groups), expected_llama_shapes(hf_config))
    aux = {n for g in groups.values() for n in g[1:]}
    for name in reader.names:
        if name in aux:
            continue
        if name in groups:
            sd = {n: reader.read(n) for n in groups[name]}
            for n, a in sd.items():
                if n.endswith(("absmax", "SCB")):  # the scales; codes are bytes (maybe stored as bf16)
                    warn_nonfinite(n, a)
            value = bnb_format.import_bnb_state_dict(sd, int8_dtype=int8_dtype)[name]
            if not isinstance(value, (quant.Packed4bit, quant.RowwiseInt8)):  # pragma: no cover - grouping invariant
                raise CheckpointError(f"{name}: bitsandbytes entries did not form a quantized weight")
            yield name, value
        else:
            array = reader.read(name)
            warn_nonfinite(name, array)
            yield name, array
