"""benchmarks/profile_decode.py runs end to end at the tiny preset (CPU): both decode paths,
their logits compared, the sweep and the JSON it writes."""

import importlib.util
import json
import os


def _script(monkeypatch):
    bench_dir = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)  # the script imports bench_sharded and _timing beside it
    spec = importlib.util.spec_from_file_location("profile_decode", os.path.join(bench_dir, "profile_decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_decode_tiny(tmp_path, monkeypatch, capsys):
    from lowbit_jax.models import llama
    from lowbit_jax.ops import _matmul_4bit_kernels as kern

    monkeypatch.setenv("OUT", str(tmp_path))
    before = (llama.LAYER_INDEXED_DECODE, llama.INPLACE_CACHE, dict(kern.GPU_CONFIG["gemv_narrow"]),
              dict(kern.GPU_CONFIG["gemv"]))
    _script(monkeypatch).main(["--preset", "tiny", "--layers", "2", "--calls", "2", "--sweep"])
    res = json.loads((tmp_path / "profile_decode.json").read_text())
    assert res["max_abs_logit_diff"] == 0.0  # layer-indexed decode == scan over sliced layers
    assert res["step_ms_indexed"] > 0 and res["step_ms_scan_slices"] > 0
    assert len(res["sweep"]) >= 2
    # the script restores the switches it flips
    assert (llama.LAYER_INDEXED_DECODE, llama.INPLACE_CACHE, kern.GPU_CONFIG["gemv_narrow"],
            kern.GPU_CONFIG["gemv"]) == before
    assert "indexed vs scanned slices" in capsys.readouterr().out
