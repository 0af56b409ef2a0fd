"""Hugging Face checkpoint directories read one tensor at a time (safetensors, memory-mapped).

A 70B checkpoint does not fit in host memory; quantize-on-load only works if the reader hands
out one tensor, lets it be quantized and dropped, then maps the next. ``safe_open`` memory-maps
the file, so a tensor's bytes are paged in only when it is read.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_files(path: str) -> dict[str, str]:
    """Map tensor name -> file for a checkpoint directory (single file or sharded index)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(path, v))})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    others = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if others:
        from safetensors import safe_open

        files = {}
        for n in others:
            with safe_open(os.path.join(path, n), framework="numpy") as f:
                files.update({name: os.path.join(path, n) for name in f.keys()})
        return files
    raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path!r} (only safetensors checkpoints are read here)")


def iter_tensors(path: str, names=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` one tensor at a time, file by file (each file mapped once)."""
    from safetensors import safe_open

    files = checkpoint_files(path)
    wanted = list(files) if names is None else list(names)
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        if name not in files:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {path!r}")
        by_file.setdefault(files[name], []).append(name)
    for file, tensor_names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for name in tensor_names:
                yield name, f.get_tensor(name)  # bfloat16 arrives as ml_dtypes.bfloat16


def read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json")
    with open(cfg_path) as f:
        return json.load(f)
