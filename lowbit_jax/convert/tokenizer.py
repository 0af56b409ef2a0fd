"""Tokenizers from a checkpoint directory (``tokenizer.json``), and chat formatting, without torch."""

from __future__ import annotations

import json
import os


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the bits of ``tokenizer_config.json`` generation needs."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path!r} has no tokenizer.json")
        self.tok = Tokenizer.from_file(tj)
        cfg_path = os.path.join(path, "tokenizer_config.json")
        self.config = {}
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                self.config = json.load(f)

    def _special(self, name):
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value

    @property
    def eos_ids(self):
        eos = self._special("eos_token")
        ids = set()
        for t in (eos, "<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            if t is not None and self.tok.token_to_id(t) is not None:
                ids.add(self.tok.token_to_id(t))
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        """The checkpoint's chat template (jinja2) applied to one user turn, generation prompt on."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
        template = self.config.get("chat_template")
        if template:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self._special("bos_token") or "", eos_token=self._special("eos_token") or "",
            )
        # ChatML, the common default for templates-less checkpoints.
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"
