"""Torch-free reading of torch.save zip checkpoints (compared against torch.load)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lowbit_jax.convert.safety import CheckpointError
from lowbit_jax.convert.torch_bin import load_torch_bin


def test_state_dict_matches_torch_load(torch, rng, tmp_path):
    base = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    sd = {
        "w": base,
        "w_t": base.t(),  # non-contiguous view of the same storage
        "slice": base[2:5, 1:7],  # storage offset + strides
        "bf16": torch.from_numpy(rng.standard_normal(9).astype(np.float32)).to(torch.bfloat16),
        "fp16": torch.from_numpy(rng.standard_normal((2, 3)).astype(np.float32)).half(),
        "i64": torch.from_numpy(rng.integers(-5, 5, 7)),
        "u8": torch.from_numpy(rng.integers(0, 255, 11).astype(np.uint8)),
        "b": torch.from_numpy(rng.standard_normal(3) > 0),
        "p": torch.nn.Parameter(torch.from_numpy(rng.standard_normal(4).astype(np.float32))),
        "nested": {"list": [torch.arange(3), 2.5, "text", None], "tuple": (1, torch.ones(1))},
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.25),
    }
    f = tmp_path / "model.bin"
    torch.save(sd, f)
    ours = load_torch_bin(f)
    ref = torch.load(f, weights_only=True)

    def check(a, b):
        if isinstance(b, torch.Tensor):
            want = b.float().numpy() if b.dtype == torch.bfloat16 else b.detach().numpy()
            got = a.astype(np.float32) if b.dtype == torch.bfloat16 else a
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        elif isinstance(b, dict):
            assert set(a) == set(b)
            for k in b:
                check(a[k], b[k])
        elif isinstance(b, (list, tuple)):
            assert type(a) is type(b) and len(a) == len(b)
            for x, y in zip(a, b):
                check(x, y)
        else:
            assert a == b

    check(ours, ref)
    assert str(ours["bf16"].dtype) == "bfloat16"


def test_loader_never_imports_torch(torch, tmp_path):
    f = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2, 2)}, f)
    code = (
        "import sys; from lowbit_jax.convert.torch_bin import load_torch_bin; "
        f"d = load_torch_bin({str(f)!r}); assert d['w'].sum() == 4; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_legacy_format_gets_resave_advice(torch, tmp_path):
    f = tmp_path / "old.bin"
    torch.save({"w": torch.ones(2)}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="re-save it as safetensors"):
        load_torch_bin(f)


def test_not_a_checkpoint(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch"):
        load_torch_bin(f)
