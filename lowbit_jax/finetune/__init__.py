"""QLoRA fine-tuning of the Llama-family decoder: adapters on the stacked-layer tree, a
chat dataset, a remat'd training step with an 8-bit optimizer, PEFT-format save, merge.

``lowbit-jax finetune`` runs :func:`recipe.run`; the pieces are usable on their own.
"""

from lowbit_jax.finetune.adapters import (
    add_adapters,
    adapter_tree,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from lowbit_jax.finetune.data import Example, jsonl_examples, pydoc_examples, split_examples, tokenize
from lowbit_jax.finetune.recipe import FinetuneConfig, run
from lowbit_jax.finetune.training import make_eval, make_loss, make_step, perplexity, setup, train

__all__ = [
    "add_adapters",
    "adapter_tree",
    "load_adapters",
    "merge_adapters",
    "save_adapters",
    "Example",
    "jsonl_examples",
    "pydoc_examples",
    "split_examples",
    "tokenize",
    "FinetuneConfig",
    "run",
    "make_eval",
    "make_loss",
    "make_step",
    "perplexity",
    "setup",
    "train",
]
