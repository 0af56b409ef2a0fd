"""PyTorch ``.bin``/``.pt`` checkpoints read into numpy without torch and without running code.

``torch.save`` writes a zip: ``<prefix>/data.pkl`` (a pickle of the state dict, where every
tensor is a call to ``torch._utils._rebuild_tensor_v2`` over a storage referenced by persistent
id) and ``<prefix>/data/<key>`` (each storage's raw little-endian bytes). A pickle can name any
importable callable -- ``os.system`` included -- and ``pickle.load`` will call it. Here the
unpickler resolves globals only from a fixed allowlist that maps each to our own rebuilder;
every other global raises :class:`UnsafePickleError` before anything is imported or called.
Torch is never imported: the allowlisted names are matched as strings. The one other opcode
that can reach into live objects, ``BUILD`` (set attributes / call ``__setstate__``), is
refused on everything but the dicts the pickle itself made, so a pickle cannot rewrite our
rebuild functions or the storage descriptors after they were checked.

Unpickling yields :class:`TensorRef` s -- dtype, shape, where the bytes are -- and reads no
tensor data, so a loader can check every shape against ``config.json`` first and then read one
tensor at a time (memory-mapped where the zip member is stored uncompressed, as torch writes
it). :func:`load_torch_bin` is the eager form: the whole state dict as numpy arrays.

Legacy (pre-1.6, non-zip) torch files interleave pickles with raw storages and cannot be read
safely this way; they get a clear error asking for a re-save as safetensors.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Union

import numpy as np

from lowbit_jax.convert.safety import MAX_TENSOR_ELEMENTS, CheckpointError, check_zip, numpy_dtype

__all__ = ["UnsafePickleError", "TensorRef", "TorchBinReader", "load_torch_bin", "is_torch_zip"]

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
# Only these element types are ever used to view bytes: never "object" (pointers) or the like.
_SAFE_DTYPES = frozenset(_STORAGE_DTYPES.values()) | frozenset(_TORCH_DTYPES.values())
# Pickle magic number torch's legacy format writes first.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafePickleError(CheckpointError):
    """The pickle names a global outside the allowlist; nothing from it was imported or called."""


class _Frozen:
    """Objects the pickle can obtain but must not modify (BUILD/setattr from the pickle raise)."""

    __slots__ = ()

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"checkpoint pickle tries to set {key!r} on a {type(self).__name__}; refusing")

    def _init(self, **fields):
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class _StorageType(_Frozen):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self._init(dtype=dtype)


class _TorchDtype(_Frozen):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self._init(dtype=dtype)


class _Archive:
    """The open zip and how its storages are read (memory-mapped or copied, cached or not)."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str, byteorder: str, mmap: bool, cache: bool):
        self.path, self.zf, self.prefix, self.byteorder = path, zf, prefix, byteorder
        self.mmap, self.cache = mmap, cache
        self.members = set(zf.namelist())
        self.file_size = path.stat().st_size

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes start: after its local header (name + extra field)."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: member {info.filename!r} has no valid local header")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise CheckpointError(f"{self.path}: member {info.filename!r} runs past the end of the file")
        return start

    def read(self, member: str, dtype: np.dtype) -> np.ndarray:
        info = self.zf.getinfo(member)
        if info.file_size == 0:
            return np.zeros(0, dtype)
        if self.mmap and info.compress_type == zipfile.ZIP_STORED:
            raw = np.memmap(self.path, np.uint8, "r", offset=self._data_offset(info), shape=(info.file_size,))
        else:
            raw = np.frombuffer(self.zf.read(member), np.uint8)
        if dtype.itemsize > 1 and self.byteorder == "big":
            return raw.view(dtype.newbyteorder(">")).astype(dtype)
        return raw.view(dtype)


class _Storage(_Frozen):
    """A storage of the archive: its element dtype and count, read only when a tensor needs it."""

    __slots__ = ("archive", "member", "dtype", "numel", "_array")

    def __init__(self, archive: _Archive, member: str, dtype: str, numel: int):
        self._init(archive=archive, member=member, dtype=dtype, numel=numel, _array=None)

    def array(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        if self.dtype not in _SAFE_DTYPES:
            raise UnsafePickleError(f"storage {self.member!r} has element type {self.dtype!r}")
        base = self.archive.read(self.member, numpy_dtype(self.dtype))
        if self.archive.cache:
            object.__setattr__(self, "_array", base)
        return base

    def viewed_as(self, dtype: str) -> "_Storage":
        """The same bytes as another element type (``_rebuild_tensor_v3``'s dtype argument)."""
        old, new = numpy_dtype(self.dtype).itemsize, numpy_dtype(dtype).itemsize
        if (self.numel * old) % new:
            raise CheckpointError(f"storage {self.member!r}: {self.numel * old} bytes are not a whole number of {dtype}")
        return _Storage(self.archive, self.member, dtype, self.numel * old // new)


def _check_view(size, stride, offset, numel: int, where: str) -> int:
    """Validate a strided view of ``numel`` storage elements; return its element count."""
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                           for v in size + stride):  # fmt: skip
        raise CheckpointError(f"{where}: bad tensor size {size} / stride {stride}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointError(f"{where}: bad storage offset {offset!r}")
    n = 1
    for d in size:
        n *= d
    if n > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{where}: declared shape {list(size)} has {n} elements, over the {MAX_TENSOR_ELEMENTS} limit")
    if n == 0:
        return 0
    if n > numel:
        # Only a broadcast (stride-0) view is larger than its storage; reading one would let a
        # tiny file allocate an arbitrary amount of memory, and real checkpoints never hold one.
        raise CheckpointError(
            f"{where}: tensor of shape {list(size)} ({n} elements) is larger than its storage ({numel}); "
            "re-save it contiguous"
        )
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= numel:
        raise CheckpointError(
            f"{where}: tensor of size {list(size)}, stride {list(stride)}, offset {offset} reads element {last} "
            f"of a storage holding {numel}"
        )
    return n


class TensorRef(_Frozen):
    """A tensor in a torch zip archive: dtype and shape known, bytes read only by :meth:`read`."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        _check_view(shape, stride, offset, storage.numel, f"storage {storage.member!r}")
        self._init(storage=storage, offset=offset, shape=tuple(shape), stride=tuple(stride))

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.storage.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The tensor as a numpy array: a read-only view of the mapped file when it is contiguous
        and memory-mapped, else a C-contiguous copy."""
        base = self.storage.array()
        # Re-checked against the bytes actually there, not the pickle's word for them.
        n = _check_view(self.shape, self.stride, self.offset, base.size, f"storage {self.storage.member!r}")
        if n == 0:
            return np.zeros(self.shape, base.dtype)
        contiguous = tuple(int(np.prod(self.shape[i + 1:], dtype=np.int64)) for i in range(len(self.shape)))
        if all(d == 1 or s == c for d, s, c in zip(self.shape, self.stride, contiguous)):
            view = base[self.offset : self.offset + n].reshape(self.shape)
            return view if isinstance(base, np.memmap) else view.copy()
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :], shape=self.shape, strides=tuple(s * base.itemsize for s in self.stride),
            writeable=False,
        )
        return view.copy(order="C")  # not np.ascontiguousarray: that turns a 0-d scalar into shape (1,)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """``torch._utils._rebuild_tensor_v2``: a reference to a strided view of the storage."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuild got {type(storage).__name__}, expected a storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise CheckpointError(f"tensor rebuild: bad size {size!r} / stride {stride!r}")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *rest):
    if isinstance(storage, _Storage) and isinstance(dtype, _TorchDtype) and storage.dtype != dtype.dtype:
        storage = storage.viewed_as(dtype.dtype)
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


def _load_build(self):
    """``BUILD``: only on a dict the pickle made (torch's state-dict ``_metadata``), and dropped."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if not isinstance(inst, dict) or not isinstance(state, (dict, tuple, type(None))):
        raise UnsafePickleError(
            f"checkpoint pickle tries to set state on a {type(inst).__name__}; refusing (nothing was executed)"
        )


# The pure-Python unpickler, so one opcode can be guarded: the C one cannot be patched. Torch's
# pickles hold no tensor data (a few KB for a whole model), so its speed does not matter here.
_DISPATCH = dict(pickle._Unpickler.dispatch)
_DISPATCH[pickle.BUILD[0]] = _load_build


class _RestrictedUnpickler(pickle._Unpickler):
    dispatch = _DISPATCH

    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self._archive = archive
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if self.proto < 3:  # protocol 2 (torch's) spells Python 2 names: __builtin__.list, copy_reg
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
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
        if not isinstance(storage_type, _StorageType) or storage_type.dtype not in _SAFE_DTYPES:
            raise UnsafePickleError(f"persistent id names storage type {storage_type!r}")
        key = str(key)
        if key in self._storages:
            return self._storages[key]
        member = f"{self._archive.prefix}data/{key}"
        if member not in self._archive.members:
            raise CheckpointError(f"storage {key!r} missing from the archive (expected member {member!r})")
        dtype = numpy_dtype(storage_type.dtype)
        info = self._archive.zf.getinfo(member)
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0 or numel * dtype.itemsize != info.file_size:
            raise CheckpointError(
                f"storage {key!r} declares {numel} {dtype.name} elements but its member holds {info.file_size} bytes"
            )
        storage = _Storage(self._archive, member, storage_type.dtype, numel)
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


def _open(path: Path, mmap: bool, cache: bool) -> tuple[Any, _Archive]:
    """Check the archive, unpickle its object (tensors as :class:`TensorRef`), keep it open."""
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
    zf = check_zip(path)
    try:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{path}: expected exactly one <prefix>/data.pkl in the archive, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder {byteorder!r}")
        archive = _Archive(path, zf, prefix, byteorder, mmap, cache)
        unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), archive)
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
                RecursionError, struct.error) as e:  # fmt: skip
            raise CheckpointError(f"{path}: corrupt checkpoint pickle: {type(e).__name__}: {e}") from None
        return obj, archive
    except BaseException:
        zf.close()
        raise


def _materialize(obj):
    if isinstance(obj, TensorRef):
        return obj.read()
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v)
        return out
    if isinstance(obj, (list, tuple, set)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def load_torch_bin(path: PathLike) -> dict[str, Any]:
    """Read a zip-format ``torch.save`` checkpoint (state dict) into numpy arrays.

    Tensors come back as contiguous numpy arrays in memory (bfloat16 via ml_dtypes); containers
    as dicts, lists and tuples. Raises :class:`UnsafePickleError` for any non-allowlisted global
    and :class:`CheckpointError` for legacy, truncated or inconsistent files.
    """
    obj, archive = _open(Path(path), mmap=False, cache=True)
    try:
        return _materialize(obj)
    except RecursionError:
        raise CheckpointError(f"{path}: checkpoint pickle is nested too deeply") from None
    finally:
        archive.zf.close()


class TorchBinReader:
    """A ``torch.save`` state dict (flat ``{name: tensor}``), read one tensor at a time.

    Opening checks the archive (CRCs) and the pickle and learns every tensor's dtype and shape;
    :meth:`read` then maps or reads only that tensor's storage. Use as a context manager.
    """

    def __init__(self, path: PathLike, mmap: bool = True):
        self.path = Path(path)
        obj, self._archive = _open(self.path, mmap=mmap, cache=False)
        if not isinstance(obj, dict):
            self.close()
            raise CheckpointError(f"{self.path}: expected a state dict (name -> tensor), found a {type(obj).__name__}")
        bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, TensorRef)]
        if bad:
            self.close()
            raise CheckpointError(f"{self.path}: state dict entries that are not named tensors: {', '.join(bad[:5])}")
        self.tensors: dict[str, TensorRef] = dict(obj)

    def read(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        return self.tensors[name].read()

    def close(self) -> None:
        self._archive.zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
