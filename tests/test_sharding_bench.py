"""benchmarks/bench_sharded.py runs end to end at its --tiny size (CPU, 1 vs 2 devices)."""

import importlib.util
import os

import jax
import pytest

pytestmark = [
    pytest.mark.slow,  # ~40 s: two tiny models compiled for decode and a QLoRA step each
    pytest.mark.skipif(jax.device_count() < 2,
                       reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (scripts/test.sh sets it)"),
]


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_sharded.py")
    spec = importlib.util.spec_from_file_location("bench_sharded", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_sharded_tiny(tmp_path, capsys):
    results = _bench().main(["--tiny", "--gpus", "1,2", "--modes", "tp", "--trials", "1", "--steps", "1",
                             "--json", str(tmp_path / "r.json")])
    assert [(r["n"], r["mode"]) for r in results] == [(1, "tp"), (2, "tp")]
    one, two = results
    assert "error" not in one and "error" not in two
    assert two["logits_agree"], two["logits_rel_diff_vs_1"]  # same seed, same weights, 1 vs 2 devices
    # Each of 2 devices holds about half the weights (norms and the embedding are replicated).
    assert two["weights_GB_per_device"] < 0.75 * one["weights_GB_per_device"]
    for r in results:
        assert r["decode_tokens_per_s"] > 0 and r["qlora_tokens_per_s"] > 0 and r["qlora_efficiency"] > 0
    assert "| 2 | tp |" in capsys.readouterr().out
    assert (tmp_path / "r.json").exists()
