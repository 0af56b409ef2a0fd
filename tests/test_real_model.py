"""The real model (SmolLM2-135M-Instruct, shipped offline as a Q4_1 GGUF) on real English text
(``pydoc_data.topics``): our GGUF import against transformers' own GGUF loader, and perplexity
through lowbit-jax against transformers (fp32) and transformers + bitsandbytes (NF4), the
DESIGN.md quality bar."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

N_TOKENS = 192


@pytest.fixture(scope="module")
def smol():
    from lowbit_jax.convert.gguf_import import smollm2_checkpoint, smollm2_gguf_path

    return smollm2_checkpoint(progress=False), smollm2_gguf_path()


@pytest.fixture(scope="module")
def text_ids(smol):
    from lowbit_jax.cli import demo_text
    from lowbit_jax.convert.tokenizer import TextTokenizer

    return TextTokenizer(smol[0]).encode(demo_text())[:N_TOKENS]


def test_gguf_import_equals_transformers_gguf_loader(torch, smol):
    from safetensors.numpy import load_file

    path, gguf = smol
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours = load_file(os.path.join(path, "model.safetensors"))
    for name, want in ref_sd.items():
        if name == "lm_head.weight" and name not in ours:  # tied to the embedding
            continue
        assert name in ours, f"{name} missing from the import"
        np.testing.assert_array_equal(ours[name].astype(np.float32), want, err_msg=name)

    from lowbit_jax.cli import demo_text
    from lowbit_jax.convert.tokenizer import TextTokenizer

    ref_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    text = demo_text(3000)
    assert TextTokenizer(path).encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"]


def _hf_perplexity(torch, model, ids):
    with torch.no_grad():
        t = torch.tensor([ids])
        return math.exp(model(t, labels=t).loss.item())


def test_fp32_perplexity_equals_transformers(torch, smol, text_ids):
    from lowbit_jax.convert.load import load_pretrained
    from lowbit_jax.models.generate import perplexity

    path, _ = smol
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = _hf_perplexity(torch, ref, text_ids)
    got, n, _, _ = perplexity(load_pretrained(path, compute_dtype="float32", progress=False), text_ids)
    assert n == len(text_ids) - 1
    assert got == pytest.approx(want, rel=2e-4)
    assert 5 < got < 60, "a real model on real English text"


def _dequantized_linears(torch, bnbF, model):
    """bitsandbytes' CPU Linear4bit forward casts x and absmax to bf16 (a fused bf16 kernel)
    whatever the compute dtype, and repacks its weight for that kernel on the first call. To
    compare the 4-bit *algorithm* in fp32, take bitsandbytes' own dequantization of its own codes
    before any forward, as fp32 Linears to swap in later."""
    import bitsandbytes as bnb

    swaps = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if isinstance(child, bnb.nn.Linear4bit):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(bnbF.dequantize_4bit(child.weight.data, child.weight.quant_state).float())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias.float())
                swaps.append((module, child_name, lin))
    return swaps


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_perplexity_equals_transformers_bitsandbytes(torch, bnbF, smol, text_ids, quant_type):
    from lowbit_jax.convert.load import load_pretrained
    from lowbit_jax.models.generate import perplexity
    from lowbit_jax.nn.config import QuantConfig

    path, _ = smol
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                              bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_cfg,
                                                            dtype=torch.float32, device_map="cpu").eval()
    swaps = _dequantized_linears(torch, bnbF, ref)
    fused_bf16 = _hf_perplexity(torch, ref, text_ids)
    for module, child_name, lin in swaps:
        setattr(module, child_name, lin)
    exact = _hf_perplexity(torch, ref, text_ids)
    model = load_pretrained(path, quant=QuantConfig(quant_type=quant_type, compute_dtype="float32"),
                            compute_dtype="float32", progress=False)
    got, _, _, _ = perplexity(model, text_ids)
    # same codes and scales (bit-exact quantization, tested in test_quant_parity); fp32 matmuls
    # that differ in summation order only
    assert got == pytest.approx(exact, rel=2e-4)
    # bitsandbytes' own CPU forward computes in bf16: close, not equal
    assert got == pytest.approx(fused_bf16, rel=2e-2)
    fp32, _, _, _ = perplexity(load_pretrained(path, compute_dtype="float32", progress=False), text_ids)
    assert got > fp32, "4-bit costs some perplexity"
