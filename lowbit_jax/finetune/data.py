"""Chat-formatted training data: real English from the standard library, or any local JSONL.

Fine-tuning needs text the model has not memorised in this exact form, available offline, with
a held-out part to measure learning on. ``pydoc_data.topics`` (the Python language reference
that ships with CPython, 79 topics) is turned into one question/answer conversation a topic;
the split is by topic, so held-out answers are text the adapters never saw.

Sequences are tokenized through the checkpoint's own chat template and trained on the
assistant's tokens only (the prompt is context, not a target), as TRL's completion-only
collator does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator, Optional, Sequence

import numpy as np

_UNDERLINE = re.compile(r"^[*=\-~^]{3,}\s*$")


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation turn: ``prompt`` (user), ``response`` (assistant), optional ``system``."""

    prompt: str
    response: str
    system: Optional[str] = None
    id: str = ""


def _title_and_body(text: str) -> tuple[Optional[str], str]:
    """A pydoc topic starts with a reST heading (title line + underline); split it off."""
    lines = text.strip("\n").split("\n")
    if len(lines) >= 2 and _UNDERLINE.match(lines[1]):
        return lines[0].strip(), "\n".join(lines[2:]).strip("\n")
    return None, text.strip("\n")


def _clip(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, cut back to the last paragraph (or line) end."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    for sep in ("\n\n", "\n"):
        pos = cut.rfind(sep)
        if pos > max_chars // 3:
            return cut[:pos].rstrip()
    return cut.rstrip()


def pydoc_examples(max_chars: int = 1200) -> list[Example]:
    """One conversation per ``pydoc_data.topics`` entry, sorted by topic name.

    The user asks about the topic (by its heading, e.g. 'The "assert" statement'); the answer
    is the start of the reference text, clipped to ``max_chars`` at a paragraph boundary.
    """
    import pydoc_data.topics as topics

    out = []
    for key in sorted(topics.topics):
        title, body = _title_and_body(topics.topics[key])
        subject = title or key.replace("-", " ")
        prompt = f"Explain {subject} in Python, as the language reference does."
        out.append(Example(prompt=prompt, response=_clip(body, max_chars), id=key))
    return out


def jsonl_examples(path: str) -> list[Example]:
    """Read a JSONL file: each line ``{"prompt", "response"[, "system"]}`` or
    ``{"messages": [{"role", "content"}, ...]}`` (the last assistant turn is the response)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            out.append(_record_to_example(rec, f"{path}:{lineno}"))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def _record_to_example(rec, where: str) -> Example:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        system = next((m["content"] for m in msgs if m.get("role") == "system"), None)
        users = [m["content"] for m in msgs if m.get("role") == "user"]
        answers = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not users or not answers:
            raise ValueError(f"{where}: 'messages' needs a user and an assistant turn")
        return Example(prompt=users[-1], response=answers[-1], system=system, id=where)
    if "prompt" in rec and "response" in rec:
        return Example(prompt=str(rec["prompt"]), response=str(rec["response"]), system=rec.get("system"), id=where)
    raise ValueError(f"{where}: expected keys 'prompt' and 'response', or 'messages'")


def split_examples(examples: Sequence[Example], heldout_fraction: float = 0.1, seed: int = 0):
    """``(train, heldout)``: a seeded shuffle, then the first ``heldout_fraction`` held out
    (at least one example each side)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(examples) < 2:
        raise ValueError("need at least 2 examples to split into train and held-out")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_held = min(max(1, round(len(examples) * heldout_fraction)), len(examples) - 1)
    held = [examples[i] for i in sorted(order[:n_held])]
    train = [examples[i] for i in sorted(order[n_held:])]
    return train, held


@dataclasses.dataclass
class TokenizedSet:
    """Fixed-length rows: ``tokens`` [N, T] inputs, ``targets`` [N, T] next tokens, ``mask``
    [N, T] 1.0 where the target is an assistant token (what the loss and perplexity count)."""

    tokens: np.ndarray
    targets: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def target_tokens(self) -> int:
        return int(self.mask.sum())

    def batches(self, batch_size: int, seed: Optional[int] = None, drop_last: bool = False) -> Iterator[dict]:
        """Batches as dicts of arrays; shuffled when ``seed`` is given. A short last batch is
        padded with fully masked rows (same shapes, so one compiled step) unless dropped."""
        n = len(self)
        order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < batch_size and drop_last:
                return
            b = {"tokens": self.tokens[idx], "targets": self.targets[idx], "mask": self.mask[idx]}
            pad = batch_size - len(idx)
            if pad:
                b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
            yield b


def tokenize(examples: Sequence[Example], tokenizer, seq_len: int) -> TokenizedSet:
    """Chat-template each example, mask the prompt, truncate/pad to ``seq_len`` (+1 for the shift).

    ``tokenizer`` is a :class:`lowbit_jax.convert.tokenizer.TextTokenizer`; the response ends
    with the template's end-of-turn token so the model learns to stop.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos_ids = sorted(tokenizer.eos_ids)
    end_id = tokenizer.tok.token_to_id("<|im_end|>")
    end_id = end_id if end_id is not None else (eos_ids[0] if eos_ids else 0)
    pad_id = end_id
    rows = np.full((len(examples), seq_len + 1), pad_id, np.int32)
    weight = np.zeros((len(examples), seq_len + 1), np.float32)
    for i, ex in enumerate(examples):
        prompt = tokenizer.encode(tokenizer.chat_prompt(ex.prompt, system=ex.system))
        answer = tokenizer.encode(ex.response) + [end_id]
        ids = (prompt + answer)[: seq_len + 1]
        rows[i, : len(ids)] = ids
        weight[i, len(prompt): len(ids)] = 1.0
    if not weight[:, 1:].any():
        raise ValueError(f"seq_len={seq_len} leaves no answer tokens after the prompts; raise --seq-len")
    return TokenizedSet(tokens=rows[:, :-1], targets=rows[:, 1:], mask=weight[:, 1:])
