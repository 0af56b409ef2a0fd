"""The ``lowbit-jax`` command line: convert, generate, eval, inspect, demo.

MODEL arguments take either a directory written by ``lowbit-jax convert`` (quantized tree +
config + tokenizer) or a Hugging Face checkpoint directory, which is quantized on load with
``--quant`` / ``--compute-dtype``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

CONVERTED_META = "lowbit_config.json"
QUANT_CHOICES = ("none", "nf4", "fp4", "int8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _quant_config(method: str, double_quant: bool = False, compute_dtype: str = "bfloat16"):
    from lowbit_jax.nn.config import QuantConfig

    if method not in QUANT_CHOICES:
        raise CliError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {method!r}")
    if method == "none":
        return QuantConfig(load_in_4bit=False, compute_dtype=compute_dtype)
    if method == "int8":
        return QuantConfig(load_in_4bit=False, load_in_8bit=True, compute_dtype=compute_dtype)
    return QuantConfig(quant_type=method, double_quant=double_quant, compute_dtype=compute_dtype)


def load_model(path: str, quant: str = "none", double_quant: bool = False, compute_dtype: str = "bfloat16",
               progress: bool = True):
    """A LoadedModel from a converted directory or an HF checkpoint directory."""
    from lowbit_jax.convert.load import LoadedModel, load_pretrained
    from lowbit_jax.models.config import LlamaConfig
    from lowbit_jax.nn.config import QuantConfig

    if not os.path.isdir(path):
        raise CliError(f"model directory {path!r} does not exist")
    meta_path = os.path.join(path, CONVERTED_META)
    if os.path.exists(meta_path):
        from lowbit_jax.convert.orbax_io import restore_tree

        with open(meta_path) as f:
            meta = json.load(f)
        cfg = meta["model"]
        for key in ("rope_scaling", "eos_token_id"):
            if cfg.get(key) is not None:
                cfg[key] = tuple(tuple(v) if isinstance(v, list) else v for v in cfg[key])
        params = restore_tree(os.path.join(os.path.abspath(path), "params"))
        qcfg = QuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["quant"].items()})
        return LoadedModel(LlamaConfig(**cfg), params, qcfg, meta["compute_dtype"], path, meta["quantized_layers"])
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CliError(f"{path!r} is neither a lowbit-jax conversion ({CONVERTED_META}) nor an HF checkpoint (config.json)")
    return load_pretrained(path, quant=_quant_config(quant, double_quant, compute_dtype), compute_dtype=compute_dtype,
                           progress=progress)


def _tokenizer(path: str):
    from lowbit_jax.convert.tokenizer import TextTokenizer

    return TextTokenizer(path)


def cmd_convert(args) -> int:
    from lowbit_jax.convert.atomic import atomic_dir
    from lowbit_jax.convert.orbax_io import save_tree
    from lowbit_jax.quant import footprint

    if os.path.exists(os.path.join(args.src, CONVERTED_META)):
        raise CliError(f"{args.src!r} is already converted")
    if os.path.exists(args.dst) and not args.overwrite:
        raise CliError(f"destination {args.dst!r} exists (pass --overwrite to replace it)")
    model = load_model(args.src, args.quant, args.double_quant, args.compute_dtype)
    meta = {
        "model": dataclasses.asdict(model.config),
        "quant": dataclasses.asdict(model.quant),
        "compute_dtype": model.compute_dtype,
        "quantized_layers": model.quantized_layers,
        "source": os.path.abspath(args.src),
    }
    with atomic_dir(args.dst, overwrite=args.overwrite) as tmp:
        save_tree(tmp / "params", model.params)
        for name in TOKENIZER_FILES + ("config.json",):
            src = os.path.join(args.src, name)
            if os.path.exists(src):
                shutil.copy(src, tmp / name)
        (tmp / CONVERTED_META).write_text(json.dumps(meta, indent=2))
    fp = footprint(model.params)
    print(f"wrote {args.dst}: {args.quant}{'+dq' if args.double_quant else ''}, {len(model.quantized_layers)} layers "
          f"quantized, {fp.total_bytes / 1e6:.1f} MB ({fp.bits_per_param:.2f} bits/param)")
    return 0


def cmd_generate(args) -> int:
    from lowbit_jax.models.generate import generate

    model = load_model(args.model, args.quant, args.double_quant, args.compute_dtype)
    tok = _tokenizer(args.model)
    text = tok.chat_prompt(args.prompt) if args.chat else args.prompt
    out, stats = generate(model, tok.encode(text), args.max_new_tokens, args.temperature, args.top_p, args.seed,
                          eos_ids=tok.eos_ids)
    print(tok.decode(out))
    print(f"[{len(out)} tokens, decode {stats['decode_tokens_per_s']:.1f} tokens/s, prefill {stats['prefill_s']:.2f} s]",
          file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    if path == "pydoc":
        return demo_text()
    if not os.path.exists(path):
        raise CliError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return f.read()


def cmd_eval(args) -> int:
    from lowbit_jax.models.generate import perplexity

    text = _read_text(args.text)  # before the (slow) model load: a typo fails at once
    model = load_model(args.model, args.quant, args.double_quant, args.compute_dtype)
    tok = _tokenizer(args.model)
    ids = tok.encode(text)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise CliError("the text has fewer than 2 tokens")
    ppl, n, secs, how = perplexity(model, ids, args.window, args.stride)
    print(f"perplexity: {ppl:.4f}")
    print(f"tokens scored: {n} ({how}), {n / secs:.1f} tokens/s")
    return 0


def cmd_inspect(args) -> int:
    from lowbit_jax.quant import footprint

    model = load_model(args.model, args.quant, args.double_quant, args.compute_dtype, progress=False)
    print(footprint(model.params).table())
    return 0


def cmd_export_bnb(args) -> int:
    """Hand a quantized model to PyTorch users: transformers + bitsandbytes load DST as it is."""
    from lowbit_jax.convert.bnb_export import export_bnb_checkpoint

    model = load_model(args.model, args.quant, args.double_quant, args.compute_dtype)
    out = export_bnb_checkpoint(model, args.dst, overwrite=args.overwrite)
    dq = "+dq" if model.quant.load_in_4bit and model.quant.double_quant else ""
    print(f"wrote {out}: {len(model.quantized_layers)} layers as bitsandbytes {model.quant.method}{dq}; "
          f"PyTorch: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def demo_text(chars: int = 6000) -> str:
    """Real English text shipped with Python: the pydoc topic help, a fixed excerpt."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text[:chars]


def cmd_demo(args) -> int:
    import jax

    from lowbit_jax.convert.gguf_import import smollm2_checkpoint
    from lowbit_jax.models.generate import generate, perplexity
    from lowbit_jax.quant import footprint

    path = args.model or smollm2_checkpoint()
    tok = _tokenizer(path)
    ids = tok.encode(demo_text())[: args.tokens]
    prompt = tok.encode(tok.chat_prompt(args.prompt))
    print(f"model: {path}\ndevice: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"perplexity text: {len(ids)} tokens of pydoc_data.topics (one window)\n")
    rows, answers = [], []
    for method in args.formats.split(","):
        dq = method.endswith("+dq")
        base = method[:-3] if dq else method
        compute = "float32" if base == "none" and args.fp32_reference else args.compute_dtype
        t0 = time.perf_counter()
        model = load_model(path, base if base != "bf16" else "none", dq, compute if base != "bf16" else "bfloat16",
                           progress=False)
        load_s = time.perf_counter() - t0
        fp = footprint(model.params)
        ppl, n, secs, _ = perplexity(model, ids)
        out, stats = generate(model, prompt, args.max_new_tokens, eos_ids=tok.eos_ids)
        label = method if base != "none" else f"none ({compute})"
        rows.append((label, fp.total_bytes / 1e6, fp.bits_per_param, ppl, n / secs, stats["decode_tokens_per_s"], load_s))
        answers.append((label, tok.decode(out).strip().replace("\n", " ")))
        del model
    print(f"{'format':<16} {'MB':>8} {'bits/param':>10} {'perplexity':>10} {'eval tok/s':>10} {'decode tok/s':>12} {'load s':>7}")
    for label, mb, bpp, ppl, etps, dtps, load_s in rows:
        print(f"{label:<16} {mb:>8.1f} {bpp:>10.2f} {ppl:>10.3f} {etps:>10.1f} {dtps:>12.1f} {load_s:>7.1f}")
    print(f"\nchat: {args.prompt!r}")
    for label, answer in answers:
        print(f"  [{label}] {answer}")
    return 0


def cmd_finetune(args) -> int:
    """QLoRA recipe (lowbit_jax.finetune.recipe): every knob there is a flag here."""
    from lowbit_jax.finetune.recipe import FinetuneConfig, run

    cfg = FinetuneConfig(
        model=args.model, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, learning_rate=args.lr, r=args.rank, lora_alpha=args.alpha or 2.0 * args.rank,
        lora_dropout=args.lora_dropout, mlp=args.mlp, double_quant=not args.no_double_quant, remat=not args.no_remat, baseline=args.baseline,
        seeds=args.seeds, heldout_fraction=args.heldout_fraction, merge=args.merge, sample_tokens=args.sample_tokens,
        progress=not args.no_progress)
    run(cfg)
    return 0


def _add_model_args(p, model_arg: bool = True):
    if model_arg:
        p.add_argument("model", help="a lowbit-jax converted directory or an HF checkpoint directory")
    p.add_argument("--quant", default="none", help="for HF directories: none|nf4|fp4|int8 (quantize on load)")
    p.add_argument("--double-quant", action="store_true", help="4-bit: double-quantize the absmax")
    p.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit-jax", description="bitsandbytes-style low-bit models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="quantize an HF checkpoint and save it (orbax + config + tokenizer)")
    p.add_argument("src")
    p.add_argument("dst")
    _add_model_args(p, model_arg=False)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert, quant="nf4")

    p = sub.add_parser("generate", help="generate text")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity of a text file (or 'pydoc' for the demo text)")
    _add_model_args(p)
    p.add_argument("--text", required=True)
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: window/2)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="per-layer footprint table")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export-bnb", help="write a transformers + bitsandbytes checkpoint (safetensors + config)")
    _add_model_args(p)
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_bnb, quant="nf4")

    p = sub.add_parser("demo", help="SmolLM2-135M-Instruct in bf16/NF4/FP4/int8: footprint, perplexity, speed, chat")
    p.add_argument("--model", default=None, help="any local HF checkpoint directory instead of SmolLM2")
    p.add_argument("--formats", default="none,bf16,nf4,nf4+dq,fp4,int8")
    p.add_argument("--tokens", type=int, default=768, help="tokens of real text for the perplexity")
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--fp32-reference", action="store_true", default=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("finetune", help="QLoRA: NF4+DQ base, LoRA, adamw8bit, remat; held-out perplexity before/after")
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="pydoc", help="'pydoc' (chat set from pydoc_data.topics) or a JSONL file")
    p.add_argument("--out", default="runs/qlora", help="adapters (PEFT + orbax), summary.json, loss curves")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' inputs while training")
    p.add_argument("--mlp", action="store_true", help="adapters on gate/up/down_proj too")
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing them")
    p.add_argument("--baseline", action="store_true", help="also train on a bf16 base with optax.adamw, and compare")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--merge", action="store_true", help="merge the adapters, check, write out/merged (HF checkpoint)")
    p.add_argument("--sample-tokens", type=int, default=0, help="answer a held-out prompt before/after training")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lowbit-jax {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
