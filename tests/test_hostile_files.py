"""Hostile and broken checkpoints through ``load_pretrained`` itself: each is refused with an error
naming the file/tensor and what was expected, nothing is executed, nothing is written; NaN/Inf
weights warn by name and quantization stays defined; interrupted writers leave no checkpoint.

Checkpoints are built with numpy (torch only where a real ``torch.save`` file is the point).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from lowbit_jax import quant as Q
from lowbit_jax.convert import bnb_format as B
from lowbit_jax.convert.atomic import TMP_MARKER, is_temporary
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.convert.safety import CheckpointError, expected_llama_shapes
from lowbit_jax.convert.torch_bin import UnsafePickleError
from lowbit_jax.nn.config import QuantConfig

CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=64,
           intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
NF4 = QuantConfig(min_size=0, compute_dtype="float32")


def _tensors(rng) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * 0.02 if len(s) == 2 else np.ones(s)).astype(np.float32)
            for n, s in expected_llama_shapes(CFG).items()}  # fmt: skip


def _ckpt(tmp_path, tensors=None, cfg=CFG, name="ckpt", rng=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _snapshot(d):
    return sorted((p.name, p.stat().st_size) for p in d.iterdir())


def _load(d, quant=None):
    before = _snapshot(d)
    try:
        return load_pretrained(str(d), quant=quant, compute_dtype="float32", progress=False)
    finally:
        assert _snapshot(d) == before  # a failed (or successful) load writes nothing


def _raw_safetensors(path, header: dict, data: bytes = b"", header_len=None):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if header_len is None else header_len) + hb + data)


# ----------------------------------------------------------------------------------------------
# malicious pickles
# ----------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvilEval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').write('pwned')",)


def _torch_like_zip(path, pkl: bytes, members: dict | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for name, data in (members or {}).items():
            zf.writestr(f"archive/data/{name}", data)


@pytest.mark.parametrize("evil", [_Evil, _EvilEval])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, evil):
    marker = tmp_path / "PWNED"
    d = _ckpt(tmp_path)
    _torch_like_zip(d / "pytorch_model.bin", pickle.dumps({"w": evil(marker)}, protocol=2))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"(posix\.system|builtins\.eval).*not on the allowlist.*nothing was executed"):
        _load(d)
    assert not marker.exists()


def test_malicious_object_inside_a_real_torch_save(tmp_path, torch):
    """torch.save of a state dict smuggling an object whose __reduce__ calls os.system."""
    marker = tmp_path / "PWNED"
    d = _ckpt(tmp_path)
    sd = {n: torch.from_numpy(a) for n, a in _tensors(np.random.default_rng(0)).items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = _Evil(marker)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(UnsafePickleError, match="system"):
        _load(d)
    assert not marker.exists()


def test_pickle_cannot_rewrite_allowed_callables(tmp_path):
    """BUILD (set attributes) on an allowlisted function -- e.g. to swap its __defaults__ or
    __code__ -- is refused, and the function is untouched."""
    from lowbit_jax.convert import torch_bin

    # GLOBAL _codecs.encode; {"__defaults__": ("rot13",)}; BUILD
    pkl = b"\x80\x02c_codecs\nencode\n}X\x0c\x00\x00\x00__defaults__X\x05\x00\x00\x00rot13\x85sb."
    d = _ckpt(tmp_path)
    _torch_like_zip(d / "pytorch_model.bin", pkl)
    with pytest.raises(UnsafePickleError, match="tries to set state on a function"):
        _load(d)
    assert torch_bin._codecs_encode.__defaults__ == ("utf-8",)


_LONG_2_31 = b"\x8a\x05\x00\x00\x00\x80\x00"  # pickle LONG1: 2**31


def test_pickle_lying_about_storage_and_huge_shapes(tmp_path, torch):
    d = _ckpt(tmp_path)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    raw = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        pkl = zf.read(name)
        storage = zf.read(next(n for n in zf.namelist() if "/data/" in n))
    # a 1-element storage declared as 4 elements; the tensor view as [2**31, 2**31] with stride 0
    lies = {
        "declares 4 float32 elements but its member holds 4 bytes": (pkl, storage[:4]),
        "over the": (pkl.replace(b"K\x04\x85", _LONG_2_31 * 2 + b"\x86").replace(b"K\x01\x85", b"K\x00K\x00\x86"), storage),
    }  # fmt: skip
    for message, (p, s) in lies.items():
        (d / "pytorch_model.bin").unlink(missing_ok=True)
        _torch_like_zip(d / "pytorch_model.bin", p, {"0": s})
        with pytest.raises(CheckpointError, match=message):
            _load(d)


def test_legacy_torch_file_asks_for_safetensors(tmp_path, torch):
    d = _ckpt(tmp_path)
    torch.save({"w": torch.ones(2)}, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="re-save it as safetensors"):
        _load(d)


# ----------------------------------------------------------------------------------------------
# truncated and corrupt files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [4, 20, 0.5, -1])
def test_truncated_safetensors(tmp_path, rng, keep):
    d = _ckpt(tmp_path, _tensors(rng))
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(too short|truncated)"):
        _load(d)


def test_truncated_and_corrupt_torch_zip(tmp_path, rng, torch):
    d = _ckpt(tmp_path)
    f = d / "pytorch_model.bin"
    torch.save({n: torch.from_numpy(a) for n, a in _tensors(rng).items()}, f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _load(d)
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF  # inside some storage: its CRC no longer matches
    f.write_bytes(bytes(corrupt))
    with pytest.raises(CheckpointError, match="CRC|corrupt"):
        _load(d)


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    d = _ckpt(tmp_path)
    with zipfile.ZipFile(d / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("archive/data/0", b"\0" * (64 << 20))  # 64 MiB of zeros deflate to ~64 KiB
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="zip bomb"):
        _load(d)
    assert time.perf_counter() - t0 < 2


# ----------------------------------------------------------------------------------------------
# lying safetensors headers
# ----------------------------------------------------------------------------------------------

_E = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"a": dict(_E, data_offsets=[0, 16])}, b"\0" * 8, r"tensor 'a'.*run past the end"),
        ({"a": dict(_E, data_offsets=[0, 8])}, b"\0" * 16, r"tensor 'a'.*holds 8 bytes but shape \[4\] of F32 needs 16"),
        ({"a": _E, "b": dict(_E, data_offsets=[8, 24])}, b"\0" * 24, r"'a'.*'b'.*overlap"),
        ({"a": dict(_E, shape=[1 << 31, 1 << 31], data_offsets=[0, 16])}, b"\0" * 16, r"tensor 'a'.*over the .* limit"),
        ({"a": dict(_E, shape=[-4])}, b"\0" * 16, r"tensor 'a'.*negative"),
        ({"a": dict(_E, dtype="PYOBJ")}, b"\0" * 16, r"tensor 'a'.*unknown dtype 'PYOBJ'"),
        ({"a": dict(_E, data_offsets=[16, 0])}, b"\0" * 16, r"tensor 'a'.*not 0 <= begin <= end"),
    ],
    ids=["past-end", "dtype-size", "overlap", "huge-shape", "negative", "dtype", "reversed"],
)
def test_lying_safetensors_header(tmp_path, header, data, message):
    d = _ckpt(tmp_path)
    _raw_safetensors(d / "model.safetensors", header, data)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        _load(d)
    assert time.perf_counter() - t0 < 5  # refused from the header: nothing allocated or read


def test_lying_header_length_and_garbage_header(tmp_path):
    d = _ckpt(tmp_path)
    _raw_safetensors(d / "model.safetensors", {}, header_len=1 << 60)
    with pytest.raises(CheckpointError, match="header length"):
        _load(d)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"\xff{[}x")
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        _load(d)


def test_lying_index(tmp_path, rng):
    d = _ckpt(tmp_path, _tensors(rng))
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    outside = tmp_path / "outside.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(outside))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {Q_PROJ: "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard name '\.\./outside\.safetensors' is not a file inside"):
        _load(d)
    index.write_text(json.dumps({"weight_map": {"model.layers.0.mlp.extra.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="index names tensors its shards do not hold.*mlp.extra"):
        _load(d)


# ----------------------------------------------------------------------------------------------
# shapes against config.json
# ----------------------------------------------------------------------------------------------


def test_shape_mismatch_against_config(tmp_path, rng):
    t = _tensors(rng)
    t[Q_PROJ] = t[Q_PROJ][:, :32].copy()
    del t["model.layers.0.mlp.up_proj.weight"]
    d = _ckpt(tmp_path, t)
    with pytest.raises(ValueError, match=r"(?s)2 problems.*q_proj\.weight: shape \(64, 32\), config expects \(64, 64\)"
                                         r".*up_proj\.weight: missing"):  # fmt: skip
        _load(d)


def test_bitsandbytes_entries_lying_about_their_weight(tmp_path, rng):
    t = _tensors(rng)
    sd = B.export_bnb_state_dict({**t, Q_PROJ: Q.quantize_4bit(t[Q_PROJ], 64, "nf4")})
    qs_key = f"{Q_PROJ}.quant_state.bitsandbytes__nf4"
    qs = json.loads(bytes(sd[qs_key]))
    qs["shape"] = [64, 32]  # says half the weight: the config check names it
    d = _ckpt(tmp_path, dict(sd, **{qs_key: np.frombuffer(json.dumps(qs).encode(), np.uint8)}), name="half")
    with pytest.raises(ValueError, match=r"q_proj.weight: shape \(64, 32\), config expects \(64, 64\)"):
        _load(d)
    d = _ckpt(tmp_path, dict(sd, **{Q_PROJ: sd[Q_PROJ][:-8]}), name="short")  # packed bytes cut short
    with pytest.raises(CheckpointError, match="packed weight holds 2040 bytes; shape .* needs 2048"):
        _load(d)
    d = _ckpt(tmp_path, dict(sd, **{f"{Q_PROJ}.quant_map": sd[f"{Q_PROJ}.quant_map"][::-1].copy()}), name="codes")
    with pytest.raises(CheckpointError, match="quant_map is not bitsandbytes' nf4 code table"):
        _load(d)


# ----------------------------------------------------------------------------------------------
# NaN / Inf weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nf4", "nf4+dq", "int8"])
def test_nonfinite_weights_warn_by_name_and_stay_local(tmp_path, rng, method):
    t = _tensors(rng)
    t[Q_PROJ][3, 5] = np.nan  # block 3*64+5 // 64 = 3
    t[Q_PROJ][40, 1] = np.inf  # block 40
    d = _ckpt(tmp_path, t)
    quant = (QuantConfig(load_in_4bit=False, load_in_8bit=True, min_size=0, compute_dtype="float32") if method == "int8"
             else QuantConfig(double_quant=method.endswith("dq"), min_size=0, compute_dtype="float32"))  # fmt: skip
    with pytest.warns(RuntimeWarning, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has 1 NaN and 1 Inf"):
        loaded = _load(d, quant)
    w = _layer0(loaded, "q_proj")  # [out, in]
    bad_rows = {3, 40}
    finite_rows = [r for r in range(64) if r not in bad_rows]
    assert np.isfinite(w[finite_rows]).all()  # every other block/row is untouched by the bad values
    want = Q.dequantize(quant_ref(t[Q_PROJ], method, finite_rows))
    np.testing.assert_allclose(w[finite_rows], np.asarray(want), rtol=0.05, atol=2e-3)
    # the rest of the model is unaffected
    assert np.isfinite(_layer0(loaded, "v_proj")).all()


def _layer0(loaded, name):
    import jax

    return np.asarray(Q.dequantize(jax.tree.map(lambda x: x[0], loaded.params["layers"][name]["kernel"]), np.float32))


def quant_ref(w, method, rows):
    """The same rows quantized on their own (no bad values anywhere)."""
    w = w[rows]
    if method == "int8":
        return Q.quantize_int8(w.astype(np.float16))
    return Q.quantize_4bit(w, 64, "nf4", method.endswith("dq"))


# ----------------------------------------------------------------------------------------------
# interrupted writers
# ----------------------------------------------------------------------------------------------


def test_failing_export_leaves_nothing(tmp_path, rng, monkeypatch):
    from lowbit_jax.convert import bnb_export

    d = _ckpt(tmp_path, _tensors(rng))
    loaded = _load(d, NF4)
    calls = []

    def boom(path, entries):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(bnb_export, "_write_shard", boom)
    with pytest.raises(OSError, match="disk full"):
        bnb_export.export_bnb_checkpoint(loaded, tmp_path / "out")
    assert calls and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


_KILLED_WRITER = """
import sys, time
from lowbit_jax.convert import bnb_export
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.nn.config import QuantConfig

real = bnb_export._write_shard
def slow(path, entries):
    real(path, entries)  # one whole shard is on disk ...
    print("WROTE", flush=True)
    time.sleep(60)  # ... and the process is killed here
bnb_export._write_shard = slow
m = load_pretrained(sys.argv[1], quant=QuantConfig(min_size=0), progress=False)
bnb_export.export_bnb_checkpoint(m, sys.argv[2], max_shard_bytes=4096)
"""


def test_killed_export_leaves_no_complete_looking_output(tmp_path, rng):
    d = _ckpt(tmp_path, _tensors(rng))
    out = tmp_path / "exported"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(d), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WROTE", "the writer did not get to its first shard"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftovers and all(is_temporary(p) and TMP_MARKER in p.name for p in leftovers)
    # the half-written temporary is not something the loader would take for a checkpoint
    with pytest.raises((FileNotFoundError, ValueError)):
        load_pretrained(str(leftovers[0]), progress=False)
