"""Shared test fixtures: the real bitsandbytes (CPU) as the reference peer."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    # bitsandbytes' double-quant offset is a torch float32 mean; torch splits reductions of
    # >= 32768 elements across threads, so one thread makes its summation order the reference.
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def bnbF(torch):
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    F = pytest.importorskip("bitsandbytes.functional")
    return F


@pytest.fixture
def rng(request):
    """A generator per test seeded from its name (reproducible); LOWBIT_TEST_SEED varies the data."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("LOWBIT_TEST_SEED", "0"))
    return np.random.default_rng(seed)


TORCH_DTYPES = ("float32", "bfloat16", "float16")


def to_torch(torch, x: np.ndarray, dtype: str):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(getattr(torch, dtype))


def from_torch(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()
