"""The README's code is real: each tour snippet in docs/snippets is shown verbatim (test_snippets
runs those files), and every other Python block in the README runs as a script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SNIPPETS = {p.name: p.read_text() for p in sorted((ROOT / "docs" / "snippets").glob("*.py"))}
OTHER = [b for b in BLOCKS if b not in SNIPPETS.values()]


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_is_in_the_readme_verbatim(name):
    assert SNIPPETS[name] in BLOCKS, f"README.md does not show docs/snippets/{name} as it is"


def test_readme_has_the_two_commands():
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


@pytest.mark.parametrize("index", range(len(OTHER)))
def test_other_readme_blocks_run(index, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", OTHER[index]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index} failed:\n{OTHER[index]}\n{proc.stderr[-3000:]}"
