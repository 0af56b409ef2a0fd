"""PyTorch ``.bin``/``.pt`` checkpoints read into numpy without torch and without running code.

``torch.save`` writes a zip: ``<prefix>/data.pkl`` (a pickle of the state dict, where every
tensor is a call to ``torch._utils._rebuild_tensor_v2`` over a storage referenced by persistent
id) and ``<prefix>/data/<key>`` (each storage's raw little-endian bytes). A pickle can name any
importable callable -- ``os.system`` included -- and ``pickle.load`` will call it. Here the
unpickler resolves globals only from a fixed allowlist that maps each to our own numpy
rebuilder; every other global raises :class:`UnsafePickleError` before anything is imported or
called. Torch is never imported: the allowlisted names are matched as strings.

Legacy (pre-1.6, non-zip) torch files interleave pickles with raw storages and cannot be read
safely this way; they get a clear error asking for a re-save as safetensors.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Union

import numpy as np

from lowbit_jax.convert.safety import CheckpointError, check_zip, numpy_dtype

__all__ = ["UnsafePickleError", "load_torch_bin", "is_torch_zip"]

PathLike = Union[str, os.PathLike]

# torch storage class name -> numpy dtype name (the dtype of the bytes in data/<key>).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
}
# torch.<dtype> objects appear as globals in newer pickles (e.g. _rebuild_tensor_v3's dtype arg).
_TORCH_DTYPES = {
    "float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "bool": "bool",
}  # fmt: skip
# Pickle magic number torch's legacy format writes first.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allowlist; nothing from it was imported or called."""


class _Storage:
    """A storage's bytes viewed as its element dtype (what the tensor rebuild strides over)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _TorchDtype:
    def __init__(self, dtype: str):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """``torch._utils._rebuild_tensor_v2``: a strided view of the storage, copied contiguous."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuild got {type(storage).__name__}, expected a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in size + stride):
        raise CheckpointError(f"tensor rebuild: bad size {size} / stride {stride}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"tensor rebuild: bad storage offset {storage_offset!r}")
    base = storage.array
    n = int(np.prod(size, dtype=object)) if size else 1
    if n == 0:
        return np.zeros(size, base.dtype)
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= base.size:
        raise CheckpointError(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} reads element {last} of a "
            f"storage holding {base.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        base[storage_offset:], shape=size, strides=tuple(s * base.itemsize for s in stride), writeable=False
    )
    return view.copy(order="C")  # not np.ascontiguousarray: that turns a 0-d scalar into shape (1,)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *rest):
    if isinstance(dtype, _TorchDtype) and storage.array.dtype != numpy_dtype(dtype.dtype):
        storage = _Storage(storage.array.view(numpy_dtype(dtype.dtype)))
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, *rest):
    return data


def _torch_size(*args):
    return tuple(*args)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1"); nothing else is allowed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode(encoding)


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._zf = zf
        self._prefix = prefix
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}
        self._members = set(zf.namelist())

    def find_class(self, module: str, name: str):
        fn = _ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(_TORCH_DTYPES[name])
        raise UnsafePickleError(
            f"checkpoint pickle references {module}.{name}, which is not on the allowlist of tensor "
            "rebuild functions; refusing to load it (nothing was executed)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"persistent id names storage type {storage_type!r}")
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        member = f"{self._prefix}data/{key}"
        if member not in self._members:
            raise CheckpointError(f"storage {key!r} missing from the archive (expected member {member!r})")
        dtype = numpy_dtype(storage_type.dtype)
        info = self._zf.getinfo(member)
        if not isinstance(numel, int) or numel < 0 or numel * dtype.itemsize != info.file_size:
            raise CheckpointError(
                f"storage {key!r} declares {numel} {dtype.name} elements but its member holds {info.file_size} bytes"
            )
        raw = np.frombuffer(self._zf.read(member), dtype=dtype.newbyteorder("<" if self._byteorder == "little" else ">"))
        storage = _Storage(raw.astype(dtype, copy=False) if dtype.itemsize > 1 else raw)
        self._storages[key] = storage
        return storage


def is_torch_zip(path: PathLike) -> bool:
    return zipfile.is_zipfile(path)


def _legacy_error(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a legacy (pre-zip) PyTorch checkpoint, which cannot be read safely without torch; "
        "re-save it as safetensors (e.g. `safetensors.torch.save_file(torch.load(f, weights_only=True), "
        "'model.safetensors')`) and load that"
    )


def load_torch_bin(path: PathLike) -> dict[str, Any]:
    """Read a zip-format ``torch.save`` checkpoint (state dict) into numpy arrays.

    Tensors come back as contiguous numpy arrays (bfloat16 via ml_dtypes); containers as dicts,
    lists and tuples. Raises :class:`UnsafePickleError` for any non-allowlisted global and
    :class:`CheckpointError` for legacy, truncated or inconsistent files.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if not zipfile.is_zipfile(path):
        # Legacy torch.save: a protocol-2 pickle of the magic number (LONG1, 10 bytes) comes first.
        if head[:2] == b"\x80\x02" and head[2:4] == b"\x8a\x0a":
            if int.from_bytes(head[4:14], "little") == _LEGACY_MAGIC:
                raise _legacy_error(path)
        if head[257:262] == b"ustar":  # the even older tar format
            raise _legacy_error(path)
        if head.startswith(b"PK"):
            check_zip(path)  # raises the specific truncation/corruption error
        raise CheckpointError(f"{path} is not a PyTorch zip checkpoint (torch.save >= 1.6) nor a legacy one")
    with check_zip(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected exactly one <prefix>/data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder {byteorder!r}")
        unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), zf, prefix, byteorder)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path}: corrupt checkpoint pickle: {type(e).__name__}: {e}") from None
