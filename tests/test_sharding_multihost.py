"""Multi-host, simulated: two processes x 4 CPU devices under jax.distributed (gloo) load a
checkpoint onto a 2x4 mesh, run it data + tensor parallel and restore a checkpoint onto it;
the results equal one process's. The flow is docs/multihost.md's (tests/_multihost_worker.py)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.convert.orbax_io import save_tree
from lowbit_jax.models import llama
from lowbit_jax.models.generate import generate
from lowbit_jax.nn.config import QuantConfig

from test_sharding_load import write_checkpoint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path, rng):
    ckpt = write_checkpoint(tmp_path / "ckpt", rng)
    ref = load_pretrained(str(ckpt), QuantConfig(double_quant=True), compute_dtype="float32", progress=False)
    save_tree(tmp_path / "saved", jax.device_get(ref.params))
    tokens = (np.arange(24, dtype=np.int32).reshape(4, 6) * 7) % 256
    want_logits = np.asarray(llama.forward(ref.params, tokens, ref.config))
    want_ids, _ = generate(ref, [1, 2, 3], max_new_tokens=3)

    worker = os.path.join(os.path.dirname(__file__), "_multihost_worker.py")
    port, out = str(_free_port()), str(tmp_path / "out.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, worker, str(i), port, str(ckpt), str(tmp_path / "saved"), out],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got = np.load(out)
    np.testing.assert_allclose(got["logits"], want_logits, rtol=2e-5, atol=2e-5)
    assert list(got["ids"]) == list(want_ids)
    assert bool(got["restored_equal"])
