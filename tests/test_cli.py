"""The ``lowbit-jax`` command line on a tiny Llama saved by transformers, with a real tokenizer.json:
convert -> inspect/generate/eval from the converted directory, the same from the HF directory,
perplexity against transformers, and bad input as a one-line error with exit status 2."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from lowbit_jax import cli

transformers = pytest.importorskip("transformers")

TEXT = (
    "the quick brown fox jumps over the lazy dog . a lazy dog sleeps in the sun . "
    "the fox runs into the brown forest and the dog follows the fox ."
)


def _tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|im_end|>"]))
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>"}, f)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path_factory.mktemp("cli") / "tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer_json(path)
    return path


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_convert_then_inspect_generate_eval(hf_dir, tmp_path, capsys):
    dst = tmp_path / "nf4"
    rc, out, err = _run(capsys, "convert", hf_dir, dst, "--quant", "nf4", "--double-quant", "--compute-dtype", "float32")
    assert rc == 0, err
    assert "wrote" in out and (dst / cli.CONVERTED_META).exists() and (dst / "tokenizer.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p != "nf4"], "a temporary directory was left behind"

    rc, out, _ = _run(capsys, "inspect", dst)
    assert rc == 0 and "nf4" in out.lower()

    # the converted checkpoint generates what quantize-on-load from the HF directory generates
    rc, from_converted, _ = _run(capsys, "generate", dst, "--prompt", "the lazy dog", "--max-new-tokens", 8)
    assert rc == 0
    rc, from_hf, _ = _run(capsys, "generate", hf_dir, "--quant", "nf4", "--double-quant", "--compute-dtype", "float32",
                          "--prompt", "the lazy dog", "--max-new-tokens", 8)
    assert rc == 0 and from_converted == from_hf and from_converted.strip()

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rc, a, _ = _run(capsys, "eval", dst, "--text", text)
    rc2, b, _ = _run(capsys, "eval", hf_dir, "--quant", "nf4", "--double-quant", "--compute-dtype", "float32",
                     "--text", text)
    assert rc == rc2 == 0 and a.splitlines()[0] == b.splitlines()[0]


def test_eval_perplexity_equals_transformers(hf_dir, tmp_path, capsys):
    import torch
    from tokenizers import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rc, out, err = _run(capsys, "eval", hf_dir, "--quant", "none", "--compute-dtype", "float32", "--text", text)
    assert rc == 0, err
    ppl = float(out.splitlines()[0].split("perplexity:")[1])
    ids = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert ppl == pytest.approx(math.exp(loss), rel=1e-4)

    # sliding windows: stated in the output, and still a sane perplexity of the same text
    rc, out, _ = _run(capsys, "eval", hf_dir, "--compute-dtype", "float32", "--text", text, "--window", 16, "--stride", 8)
    assert rc == 0 and "sliding windows of 16 tokens, stride 8" in out
    assert np.isfinite(float(out.splitlines()[0].split(":")[1]))


def test_demo_on_a_local_checkpoint(hf_dir, capsys):
    rc, out, err = _run(capsys, "demo", "--model", hf_dir, "--formats", "none,nf4+dq,int8", "--tokens", 24,
                        "--max-new-tokens", 4, "--prompt", "the fox")
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith(("none", "nf4+dq", "int8"))]
    assert len(rows) == 3
    bits = {line.split()[0]: float(line.split()[-5]) for line in rows}  # bits/param column
    assert bits["nf4+dq"] < bits["int8"] < bits["none"] == 32.0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "/nonexistent/model"], "does not exist"),
        (["generate", "{hf}", "--quant", "int3", "--prompt", "x"], "--quant must be one of"),
        (["eval", "{hf}", "--text", "/nonexistent.txt"], "text file '/nonexistent.txt' does not exist"),
        (["inspect", "{empty}"], "neither a lowbit-jax conversion"),
    ],
)
def test_bad_input_is_one_clear_line(hf_dir, tmp_path, capsys, argv, message):
    argv = [a.format(hf=hf_dir, empty=tmp_path) for a in argv]
    rc, out, err = _run(capsys, *argv)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and message in last and last.startswith(f"lowbit-jax {argv[0]}: error:")


def test_convert_refuses_to_overwrite(hf_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, "convert", hf_dir, dst, "--quant", "fp4")
    assert rc == 2 and "exists" in err
    assert os.listdir(dst) == ["keep.txt"]
