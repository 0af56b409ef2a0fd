"""QLoRA fine-tuning pieces on a tiny random Llama: adapters on the stacked tree (identity at
init, merge == adapted forward, PEFT file layout == what transformers + PEFT's merge compute),
data masking, a remat'd QLoRA step that learns, and ``lowbit-jax finetune`` end to end.

Fresh random data everywhere (seeded per test); tolerances are stated at each comparison.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import quant
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.finetune import adapters, data as data_mod, training as train_mod
from lowbit_jax.models.llama import forward
from lowbit_jax.nn.config import QuantConfig
from lowbit_jax.nn.lora import LoraConfig, split_trainable
from lowbit_jax.testing import tiny_checkpoint

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), tie_word_embeddings=False)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _randomize_b(params, rng, scale=0.05):
    """B starts at zero (identity); give it fresh random values so the adapters do something."""
    layers = dict(params["layers"])
    for name, p in layers.items():
        if isinstance(p, dict) and "lora_B" in p:
            layers[name] = {**p, "lora_B": jnp.asarray(rng.standard_normal(p["lora_B"].shape) * scale, jnp.float32)}
    return {**params, "layers": layers}


def _tokens(rng, cfg, b=2, t=12):
    return jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)


def test_adapters_start_as_identity_and_merge_exactly(ckpt, rng):
    m = load_pretrained(ckpt, compute_dtype="float32", progress=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL)
    params = adapters.add_adapters(m.params, lora, jax.random.key(int(rng.integers(1 << 30))))
    toks = _tokens(rng, m.config)
    base = forward(m.params, toks, m.config)
    # B = 0: the adapted model is the base model, bit for bit
    np.testing.assert_array_equal(np.asarray(forward(params, toks, m.config, lora_scale=lora.scale)), np.asarray(base))
    params = _randomize_b(params, rng)
    adapted = forward(params, toks, m.config, lora_scale=lora.scale)
    assert _rel(adapted, base) > 1e-3  # the adapters act
    merged = adapters.merge_adapters(params, lora, dtype=jnp.float32)
    assert "lora_A" not in merged["layers"]["q_proj"]
    # fp32 kernels, fp32 compute: merge is a reassociation of the same sums (tolerance 1e-5 rel)
    assert _rel(forward(merged, toks, m.config), adapted) < 1e-5


def test_merge_into_nf4_base(ckpt, rng):
    q = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, min_size=0)
    m = load_pretrained(ckpt, quant=q, compute_dtype="float32", progress=False)
    assert isinstance(m.params["layers"]["q_proj"]["kernel"], quant.Packed4bit)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    params = _randomize_b(adapters.add_adapters(m.params, lora, jax.random.key(1)), rng)
    toks = _tokens(rng, m.config)
    adapted = forward(params, toks, m.config, lora_scale=lora.scale)
    # dequantized + delta in fp32: exact up to fp32 rounding (1e-5 rel)
    merged = adapters.merge_adapters(params, lora, dtype=jnp.float32)
    assert merged["layers"]["q_proj"]["kernel"].shape == (m.config.num_hidden_layers, 64, 64)
    assert _rel(forward(merged, toks, m.config), adapted) < 1e-5
    # requantized: each layer is quantize_4bit(dequantize(W) + delta) in W's own format (codes
    # equal but for rare ties flipped by fp32 summation order: <= 0.5% of the bytes)
    requant = adapters.merge_adapters(params, lora, requantize=True)
    k = requant["layers"]["q_proj"]["kernel"]
    assert isinstance(k, quant.Packed4bit) and k.double_quant and k.shape == (64, 64)
    src = params["layers"]["q_proj"]
    for i in range(m.config.num_hidden_layers):
        layer = jax.tree.map(lambda a: a[i], src["kernel"])
        delta = np.asarray(src["lora_A"][i], np.float32) @ np.asarray(src["lora_B"][i], np.float32) * lora.scale
        want = quant.quantize_4bit(quant.dequantize(layer, jnp.float32) + delta.T, compress_statistics=True)
        got = jax.tree.map(lambda a: a[i], k)
        assert np.mean(np.asarray(got.packed) != np.asarray(want.packed)) <= 5e-3
    # and the model still computes nearly the adapted function (one more NF4 rounding of W)
    assert _rel(forward(requant, toks, m.config), adapted) < 0.2


def test_peft_files_match_transformers_merge(ckpt, rng, tmp_path, torch):
    """Our adapter files, loaded the way PEFT does (W += lora_alpha/r * B @ A by module name),
    give transformers' model our adapted logits (fp32, 1e-4 rel)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    m = load_pretrained(ckpt, compute_dtype="float32", progress=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ALL)
    params = _randomize_b(adapters.add_adapters(m.params, lora, jax.random.key(2)), rng)
    out = adapters.save_adapters(str(tmp_path / "adapter"), params, lora, base_model=ckpt)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == set(ALL)
    sd = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len(sd) == 2 * len(ALL) * m.config.num_hidden_layers
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    modules = dict(hf.named_modules())
    scale = cfg["lora_alpha"] / cfg["r"]
    with torch.no_grad():
        for key, a in sd.items():
            if ".lora_A." not in key:
                continue
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            b = sd[key.replace("lora_A", "lora_B")]
            w = modules[name].weight
            assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
            w += scale * torch.from_numpy(b) @ torch.from_numpy(a)
        toks = _tokens(rng, m.config)
        ref = hf(input_ids=torch.from_numpy(np.asarray(toks)).long()).logits.numpy()
    ours = forward(params, toks, m.config, lora_scale=lora.scale)
    assert _rel(ours, ref) < 1e-4
    # and our reader restores exactly what was written
    back, back_cfg = adapters.load_adapters(out, m.params)
    assert back_cfg.r == 4 and back_cfg.scale == lora.scale
    for name in ALL:
        for key in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(np.asarray(back["layers"][name][key]), np.asarray(params["layers"][name][key]))


def test_merged_checkpoint_round_trips(ckpt, rng, tmp_path):
    from lowbit_jax.finetune.export import save_hf_checkpoint

    m = load_pretrained(ckpt, compute_dtype="float32", progress=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "o_proj"))
    params = _randomize_b(adapters.add_adapters(m.params, lora, jax.random.key(3)), rng)
    with pytest.raises(ValueError, match="merge them first"):
        save_hf_checkpoint(str(tmp_path / "bad"), params, ckpt)
    merged = adapters.merge_adapters(params, lora, dtype=jnp.float32)
    path = save_hf_checkpoint(str(tmp_path / "merged"), merged, ckpt)
    back = load_pretrained(path, compute_dtype="float32", progress=False)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert os.path.exists(os.path.join(path, "tokenizer.json"))


class _Tok:
    """A stand-in tokenizer: one id per character (ChatML prompt), '|' as end of turn."""

    eos_ids = {124}

    class tok:  # noqa: N801 - mimics TextTokenizer.tok
        @staticmethod
        def token_to_id(t):
            return 124 if t == "<|im_end|>" else None

    def encode(self, text):
        return [ord(c) % 120 for c in text]

    def chat_prompt(self, user, system=None):
        return f"U:{user}\nA:"


def test_data_masks_only_the_answer():
    ex = [data_mod.Example(prompt="hi", response="abcdef"), data_mod.Example(prompt="x" * 50, response="zz")]
    ts = data_mod.tokenize(ex, _Tok(), seq_len=16)
    assert ts.tokens.shape == ts.targets.shape == ts.mask.shape == (2, 16)
    prompt = len("U:hi\nA:")
    # targets t predict token t+1: the answer's 6 characters and the end-of-turn id are scored
    np.testing.assert_array_equal(ts.mask[0], [0] * (prompt - 1) + [1] * 7 + [0] * (16 - (prompt - 1) - 7))
    assert list(ts.targets[0][prompt - 1:prompt + 6]) == [ord(c) % 120 for c in "abcdef"] + [124]
    assert ts.mask[1].sum() == 0  # the prompt fills the window: nothing to learn from this row
    np.testing.assert_array_equal(ts.tokens[0, 1:], ts.targets[0, :-1])
    batches = list(ts.batches(3))
    assert len(batches) == 1 and batches[0]["mask"][2].sum() == 0  # padded row is fully masked


def test_pydoc_examples_split():
    ex = data_mod.pydoc_examples()
    assert len(ex) == 79 and all(e.response and e.prompt for e in ex)
    assert ex[0].prompt == 'Explain The "assert" statement in Python, as the language reference does.'
    train, held = data_mod.split_examples(ex, 0.1, seed=0)
    assert len(held) == 8 and len(train) == 71
    assert not {e.id for e in train} & {e.id for e in held}
    assert [e.id for e in data_mod.split_examples(ex, 0.1, seed=0)[1]] == [e.id for e in held]


def test_jsonl_examples(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" +
                 json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "r"}]}) + "\n")
    ex = data_mod.jsonl_examples(str(p))
    assert [(e.prompt, e.response, e.system) for e in ex] == [("a", "b", None), ("u", "r", "s")]
    p.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="prompt"):
        data_mod.jsonl_examples(str(p))


def test_qlora_step_learns_and_remat_is_exact(ckpt, rng):
    """NF4+DQ base, adapters only in the gradient; remat changes memory, not numbers
    (fp32: loss equal to 1e-6 rel, grads to 1e-5 rel); adamw8bit lowers the loss on a batch."""
    from lowbit_jax.optim import adamw8bit

    q = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True, min_size=0)
    m = load_pretrained(ckpt, quant=q, compute_dtype="float32", progress=False)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=ALL)
    params = adapters.add_adapters(m.params, lora, jax.random.key(4))
    trainable, frozen = split_trainable(params)
    assert set(trainable["layers"]) == set(ALL)
    ids = rng.integers(0, m.config.vocab_size, (4, 17)).astype(np.int32)
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "mask": (rng.random((4, 16)) < 0.8).astype(np.float32)}
    grads = {}
    for remat in (False, True):
        loss_fn = train_mod.make_loss(m.config, jnp.float32, lora.scale, remat=remat)
        grads[remat] = jax.value_and_grad(loss_fn)(_randomize_b(trainable, np.random.default_rng(0)), frozen, batch)
    assert abs(float(grads[True][0]) - float(grads[False][0])) <= 1e-6 * abs(float(grads[False][0]))
    for a, b in zip(jax.tree.leaves(grads[True][1]), jax.tree.leaves(grads[False][1])):
        assert _rel(a, b) < 1e-5
    opt = adamw8bit(1e-2, weight_decay=0.0)
    trainable, frozen, opt_state = train_mod.setup(params, opt)
    step = train_mod.make_step(train_mod.make_loss(m.config, jnp.bfloat16, lora.scale, remat=True), opt)
    losses = []
    for _ in range(8):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


def test_lora_dropout_in_the_model(ckpt, rng):
    """PEFT's lora_dropout in the Llama forward: only the adapters' inputs are dropped (zero-B
    adapters give the base output whatever the key), one key gives one output, another key
    another; without a key it refuses; a training step with dropout learns."""
    from lowbit_jax.optim import adamw8bit

    m = load_pretrained(ckpt, quant=None, compute_dtype="float32", progress=False)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=ALL)
    params = adapters.add_adapters(m.params, lora, jax.random.key(1))
    toks = _tokens(rng, m.config)
    base = forward(params, toks, m.config, lora_scale=lora.scale)
    drop = lambda p, k: forward(p, toks, m.config, lora_scale=lora.scale, lora_dropout=0.3, dropout_rng=k)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(drop(params, jax.random.key(0))), np.asarray(base))  # B = 0
    live = _randomize_b(params, np.random.default_rng(2), scale=0.2)
    ref = np.asarray(forward(live, toks, m.config, lora_scale=lora.scale))
    y0, y0b, y1 = (np.asarray(drop(live, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(y0, y0b)
    assert not np.allclose(y0, ref) and not np.allclose(y0, y1)
    # a vanishing rate keeps (almost) every input and rescales by 1/(1-p): the adapted output
    tiny = forward(live, toks, m.config, lora_scale=lora.scale, lora_dropout=1e-7, dropout_rng=jax.random.key(3))
    assert _rel(tiny, ref) < 1e-5
    with pytest.raises(ValueError, match="dropout_rng"):
        forward(live, toks, m.config, lora_dropout=0.3)
    ids = rng.integers(0, m.config.vocab_size, (4, 17)).astype(np.int32)
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((4, 16), np.float32)}
    loss_fn = train_mod.make_loss(m.config, jnp.float32, lora.scale, remat=True, lora_dropout=lora.dropout)
    with pytest.raises(ValueError, match="dropout_key"):
        loss_fn(*split_trainable(live), batch)
    opt = adamw8bit(1e-2, weight_decay=0.0)
    trainable, frozen, opt_state = train_mod.setup(params, opt)
    step = train_mod.make_step(loss_fn, opt)
    losses = []
    for i in range(8):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, dict(batch, dropout_key=jax.random.key(i)))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


def test_cli_finetune_end_to_end(ckpt, tmp_path, capsys):
    from lowbit_jax.cli import main

    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"Say the word number {i}.", "response": f"Word {i}: " + "spam " * (i % 4 + 1)}) + "\n")
    out = tmp_path / "run"
    rc = main(["finetune", "--model", ckpt, "--data", str(data), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
               "--rank", "4", "--merge", "--out", str(out), "--no-progress", "--heldout-fraction", "0.25",
               "--lora-dropout", "0.05"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out perplexity" in text
    summary = json.load(open(out / "summary.json"))
    assert [r["variant"] for r in summary["runs"]] == ["qlora"]
    assert all(len(r["losses"]) == 3 and np.isfinite(r["heldout_ppl_after"]) for r in summary["runs"])
    assert summary["runs"][0]["optimizer"] == "adamw8bit" and summary["config"]["double_quant"]
    assert summary["config"]["lora_dropout"] == 0.05
    assert json.load(open(out / "adapter" / "adapter_config.json"))["lora_dropout"] == 0.05
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "model.safetensors").exists() and (out / "loss_curves.json").exists()
    m = summary["merge"]
    # NF4 base + bf16-merged adapters vs NF4 base + adapters: the merged model reads bf16 weights (dequantized NF4,
    # rounded to bf16) -- perplexities agree to 1% on a random model
    assert abs(m["heldout_ppl_merged_bf16"] / m["heldout_ppl_adapted"] - 1) < 0.01


def test_compare_pairs_examples():
    """The within-noise verdict: the final per-example gap against twice its standard error."""
    from lowbit_jax.finetune.recipe import compare

    def rec(variant, before, after, seed=0):
        return {"variant": variant, "seed": seed, "heldout_nll_before_per_example": before,
                "heldout_nll_after_per_example": after, "heldout_ppl_after": float(np.exp(np.mean(after)))}

    base = rec("baseline", [3.0, 3.2, 2.9, 3.1], [2.0, 2.2, 1.9, 2.1])
    close = compare([rec("qlora", [3.3, 3.5, 3.2, 3.4], [2.01, 2.18, 1.92, 2.09]), base])
    assert close["within_noise"] and abs(close["start_gap"] - 0.3) < 1e-9 and abs(close["final_gap"]) < 0.02
    far = compare([rec("qlora", [3.3, 3.5, 3.2, 3.4], [2.3, 2.52, 2.2, 2.41]), base])
    assert not far["within_noise"] and abs(far["final_gap"] - 0.3075) < 1e-9
    assert compare([base]) == {}
