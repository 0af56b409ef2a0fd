"""Whole checkpoints across the PyTorch boundary, on a tiny random Llama saved by transformers:

- ours -> bitsandbytes format -> transformers + bitsandbytes: same codes, same logits;
- transformers + bitsandbytes quantize and save -> load_pretrained: the same codes and scales
  (nothing requantized), same logits;
- PyTorch ``.bin`` checkpoints (single and sharded) load to the same tree as safetensors,
  without importing torch.

Layer widths are multiples of the blocksize (bitsandbytes 0.50.2's CPU dequantize is wrong when
a block straddles rows, see test_quant_parity).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import quant as Q
from lowbit_jax.convert.bnb_export import export_bnb_checkpoint
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.models import forward
from lowbit_jax.nn.config import QuantConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it for bitsandbytes models

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
METHODS = ("nf4", "nf4+dq", "int8")  # fp4: in the load-as-stored test
# Our 4-bit matmul and bitsandbytes' CPU one agree to float32 rounding; LLM.int8 rounds the
# activations differently (bitsandbytes goes through float16 first): ~0.5% of the logits.
TOL = {"nf4": 1e-4, "nf4+dq": 1e-4, "fp4": 1e-4, "int8": 1.5e-2}


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory, torch):
    """(model, path): a tiny random Llama with random norms, saved by transformers (fp32)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_theta=10000.0))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf") / "fp32"
    model.save_pretrained(str(path))
    return model.eval(), str(path)


def _ours_config(method: str, min_size: int = 0) -> QuantConfig:
    if method == "int8":
        return QuantConfig(load_in_4bit=False, load_in_8bit=True, min_size=min_size, compute_dtype="float32")
    return QuantConfig(quant_type=method[:3], double_quant=method.endswith("+dq"), min_size=min_size,
                       compute_dtype="float32")  # fmt: skip


def _bnb_config(torch, method: str):
    if method == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method[:3],
                                           bnb_4bit_use_double_quant=method.endswith("+dq"),
                                           bnb_4bit_compute_dtype=torch.float32)  # fmt: skip


def _logits(loaded, tokens):
    return np.asarray(forward(loaded.params, jnp.asarray(tokens), loaded.config, jnp.float32, loaded.int8_threshold))


def _torch_logits(torch, model, tokens):
    # Not under no_grad: there bitsandbytes 0.50.2 repacks 4-bit weights for its bfloat16 CPU
    # kernel (AVX512-BF16 machines), ~0.3% off its own float32 path; with grad enabled it
    # dequantizes exactly and runs a float32 matmul, which is what we compare against.
    return model(torch.from_numpy(tokens)).logits.detach().float().numpy()


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # includes every static field of the quantized leaves
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _assert_same_codes_as_torch(loaded, tmodel, method, layer=1):
    """Our q_proj of ``layer`` against the bitsandbytes module's own tensors."""
    ours = jax.tree.map(lambda x: x[layer], loaded.params["layers"]["q_proj"]["kernel"])
    w = tmodel.model.layers[layer].self_attn.q_proj.weight
    if method == "int8":
        assert isinstance(ours, Q.RowwiseInt8)
        np.testing.assert_array_equal(np.asarray(ours.codes), w.CB.numpy() if w.CB is not None else w.data.numpy())
        np.testing.assert_array_equal(np.asarray(ours.row_absmax), w.SCB.numpy())
        return
    assert isinstance(ours, Q.Packed4bit) and ours.quant_type == method[:3]
    qs = w.quant_state
    np.testing.assert_array_equal(np.asarray(ours.packed), w.data.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(ours.absmax), qs.absmax.numpy())
    if method.endswith("+dq"):
        np.testing.assert_array_equal(np.asarray(ours.nested_absmax), qs.state2.absmax.numpy())
        assert np.float32(ours.offset) == np.float32(qs.offset.item())
    else:
        assert qs.state2 is None


@pytest.mark.parametrize("method", METHODS)
def test_export_loads_in_transformers_bitsandbytes(fp_checkpoint, torch, rng, tmp_path, method):
    """ours -> export_bnb_checkpoint -> transformers.from_pretrained: same codes, same logits; and
    the export loads back into the identical tree. nf4 keeps the default min_size, so small
    layers (k/v) stay unquantized and must reach transformers' skip list."""
    _, path = fp_checkpoint
    ours = load_pretrained(path, quant=_ours_config(method, 4096 if method == "nf4" else 0), compute_dtype="float32",
                           progress=False)  # fmt: skip
    out = export_bnb_checkpoint(ours, tmp_path / "exported")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] == (method == "int8")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind

    tmodel = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    import bitsandbytes as bnb

    want = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    assert isinstance(tmodel.model.layers[0].self_attn.q_proj, want)
    k_proj = tmodel.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, torch.nn.Linear if method == "nf4" else want)  # k_proj: 64x32 < min_size
    assert not isinstance(tmodel.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    _assert_same_codes_as_torch(ours, tmodel, method)

    tokens = rng.integers(0, TINY["vocab_size"], size=(2, 11))
    ref, got = _torch_logits(torch, tmodel, tokens), _logits(ours, tokens)
    np.testing.assert_allclose(got, ref, rtol=TOL[method], atol=TOL[method] * np.abs(ref).max())

    back = load_pretrained(str(out), compute_dtype="float32", progress=False)
    _assert_same_tree(back.params, ours.params)
    assert back.quant.method == ours.quant.method and back.quant.double_quant == ours.quant.double_quant


@pytest.mark.parametrize("method", ["nf4+dq", "fp4", "int8"])
def test_transformers_bitsandbytes_checkpoint_loads_as_stored(fp_checkpoint, torch, rng, tmp_path, method):
    """transformers + bitsandbytes quantize and save_pretrained -> load_pretrained: bitsandbytes'
    own codes and scales (equal to ours on the same weights), the same logits."""
    _, path = fp_checkpoint
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=_bnb_config(torch, method),
                                                               dtype=torch.float32).eval()  # fmt: skip
    saved = tmp_path / "bnb"
    tmodel.save_pretrained(str(saved))

    loaded = load_pretrained(str(saved), compute_dtype="float32", progress=False)
    assert loaded.quant.method == method[:3] if method != "int8" else loaded.quant.method == "int8"
    assert len(loaded.quantized_layers) == 2 * 7
    _assert_same_codes_as_torch(loaded, tmodel, method)
    # quantize-on-load of the fp32 checkpoint gives the very same tree (codes, scales, statics)
    _assert_same_tree(loaded.params, load_pretrained(path, quant=_ours_config(method), compute_dtype="float32",
                                                     progress=False).params)  # fmt: skip

    tokens = rng.integers(0, TINY["vocab_size"], size=(2, 11))
    ref, got = _torch_logits(torch, tmodel, tokens), _logits(loaded, tokens)
    np.testing.assert_allclose(got, ref, rtol=TOL[method], atol=TOL[method] * np.abs(ref).max())

    # and written back out, it is what transformers wrote: every tensor, byte for byte
    from safetensors.numpy import load_file

    exported = load_file(str(export_bnb_checkpoint(loaded, tmp_path / "again") / "model.safetensors"))
    original = load_file(str(saved / "model.safetensors"))
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert exported[k].tobytes() == v.tobytes(), k

    other = "nf4" if method == "int8" else "int8"
    with pytest.raises(ValueError, match="already quantized by bitsandbytes"):
        load_pretrained(str(saved), quant=_ours_config(other), progress=False)


def test_qwen2_tied_bfloat16_storage_both_ways(torch, rng, tmp_path):
    """Qwen2 (q/k/v biases), tied embeddings, bnb_4bit_quant_storage=bfloat16 (FSDP-QLoRA's
    setting): the codes survive as bytes, the tied head stays unquantized on export."""
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    fp = tmp_path / "fp"
    model.save_pretrained(str(fp))
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_quant_storage=torch.bfloat16)  # fmt: skip
    tmodel = transformers.AutoModelForCausalLM.from_pretrained(str(fp), quantization_config=cfg, dtype=torch.float32)
    tmodel.save_pretrained(str(tmp_path / "bnb"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16-stored codes are bytes, not NaN weights
        loaded = load_pretrained(str(tmp_path / "bnb"), compute_dtype="float32", progress=False)
    _assert_same_tree(loaded.params, load_pretrained(str(fp), quant=_ours_config("nf4"), compute_dtype="float32",
                                                     progress=False).params)  # fmt: skip
    tokens = rng.integers(0, TINY["vocab_size"], size=(2, 9))
    ref, got = _torch_logits(torch, tmodel, tokens), _logits(loaded, tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    out = export_bnb_checkpoint(loaded, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    np.testing.assert_allclose(_torch_logits(torch, again, tokens), got, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _bin_checkpoint(model, torch, src: str, dst, shards: int):
    dst.mkdir()
    shutil.copy(f"{src}/config.json", dst / "config.json")
    sd = model.state_dict()
    if shards in (1, "pt"):
        torch.save(sd, dst / ("pytorch_model.bin" if shards == 1 else "model.pt"))
        (dst / "training_args.bin").write_bytes(b"not weights: must be ignored")
        return str(dst)
    names = list(sd)
    weight_map = {}
    for k in range(shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[k::shards]}
        torch.save(part, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(dst)


@pytest.mark.parametrize("shards", [1, 3, "pt"])
def test_bin_checkpoint_loads_like_safetensors(fp_checkpoint, torch, tmp_path, shards):
    model, path = fp_checkpoint
    bin_path = _bin_checkpoint(model, torch, path, tmp_path / "bin", shards)
    for quant in (None, _ours_config("nf4+dq")):
        a = load_pretrained(bin_path, quant=quant, compute_dtype="float32", progress=False)
        b = load_pretrained(path, quant=quant, compute_dtype="float32", progress=False)
        _assert_same_tree(a.params, b.params)


def test_bin_loading_never_imports_torch(fp_checkpoint, torch, tmp_path):
    model, path = fp_checkpoint
    bin_path = _bin_checkpoint(model, torch, path, tmp_path / "bin", 1)
    code = (
        "import sys; from lowbit_jax.convert.load import load_pretrained; "
        f"m = load_pretrained({bin_path!r}, progress=False); "
        "assert m.params['embed'].shape == (211, 64); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_export_bnb(fp_checkpoint, tmp_path, capsys):
    from lowbit_jax import cli

    _, path = fp_checkpoint
    out = tmp_path / "exported"
    assert cli.main(["export-bnb", path, str(out), "--double-quant", "--compute-dtype", "float32"]) == 0
    assert "as bitsandbytes nf4+dq" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_use_double_quant"] and qc["bnb_4bit_quant_type"] == "nf4"
    back = load_pretrained(str(out), progress=False)
    assert back.quant.method == "nf4" and back.quant.double_quant
    # an existing destination, and a model with nothing quantized: one-line errors, exit status 2
    assert cli.main(["export-bnb", path, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export-bnb", path, str(tmp_path / "fp"), "--quant", "none"]) == 2
    assert "nothing in the model is quantized" in capsys.readouterr().err
    assert not (tmp_path / "fp").exists()
