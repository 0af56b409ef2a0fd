"""Loss curves of fine-tuning runs: JSON always, a PNG when matplotlib is importable.

Kept apart from training so the training loop never imports a plotting library.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np


def _label(r: dict) -> str:
    return f"{r['variant']} ({r['base']}, {r['optimizer']}), seed {r['seed']}"


def write_curves(runs: list, path: str) -> str:
    """``{label: [loss per step]}`` plus held-out perplexities before/after, as JSON."""
    out = {_label(r): {"loss": r["losses"], "heldout_ppl_before": r["heldout_ppl_before"],
                       "heldout_ppl_after": r["heldout_ppl_after"]} for r in runs}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return path


def smooth(values, window: int = 5) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    v = np.asarray(values, np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(runs: list, path: str, window: int = 5) -> Optional[str]:
    """Training loss per step (raw, faint; moving average, solid) for every run; returns the
    path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"qlora": "tab:blue", "baseline": "tab:orange"}
    for r in runs:
        color = colors.get(r["variant"], None)
        steps = np.arange(1, len(r["losses"]) + 1)
        ax.plot(steps, r["losses"], color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth(r["losses"], window), color=color, lw=1.8,
                label=f"{_label(r)}: held-out ppl {r['heldout_ppl_before']:.2f} -> {r['heldout_ppl_after']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title("QLoRA (NF4+DQ base, adamw8bit) vs LoRA on a bf16 base (optax.adamw)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
