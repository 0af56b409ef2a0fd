"""Every README tour snippet in docs/snippets runs, as a user would run it (its own process,
a scratch working directory), and its own asserts hold. A snippet that rots fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SNIPPETS = sorted((Path(__file__).resolve().parent.parent / "docs" / "snippets").glob("*.py"))


def test_there_are_snippets():
    names = {p.name for p in SNIPPETS}
    assert {"quant_dense.py", "quantize_model.py", "adamw8bit_step.py", "convert_checkpoint.py", "qlora.py",
            "qlora_llama.py"} <= names


@pytest.mark.parametrize("path", SNIPPETS, ids=[p.name for p in SNIPPETS])
def test_snippet_runs(path, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONWARNINGS="ignore")
    env.pop("XLA_FLAGS", None)  # one host device, as a user's plain run has
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"
