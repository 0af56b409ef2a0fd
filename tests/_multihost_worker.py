"""One process of the two-process test of multi-host use (tests/test_sharding_multihost.py).

It is the flow docs/multihost.md describes, run under ``jax.distributed`` on the CPU: two
processes with 4 devices each stand in for two hosts with 4 GPUs each.
    python tests/_multihost_worker.py PROCESS_ID PORT CHECKPOINT SAVED_TREE OUT.npz
"""

import os
import sys

pid, port, ckpt, saved, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # this "host" has 4 devices

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on the CPU
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from lowbit_jax import sharding, sharding_io  # noqa: E402
from lowbit_jax.convert.load import load_pretrained  # noqa: E402
from lowbit_jax.models import llama  # noqa: E402
from lowbit_jax.models.generate import generate  # noqa: E402
from lowbit_jax.nn.config import QuantConfig  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
# Data parallel across "hosts", tensor parallel within one (the per-layer psums stay local).
mesh = Mesh(np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count()), ("dp", "tp"))
model = load_pretrained(ckpt, QuantConfig(double_quant=True), compute_dtype="float32",
                        progress=False, mesh=mesh)
q = model.params["layers"]["q_proj"]["kernel"]
assert len(q.packed.addressable_shards) == 4  # this process holds its 4 devices' shards only
tp = dataclasses.replace(model.tp, batch_axis="dp")

# Each process feeds its own half of the batch.
tokens = (np.arange(24, dtype=np.int32).reshape(4, 6) * 7) % 256
local = tokens[pid * 2:(pid + 1) * 2]
x = jax.make_array_from_process_local_data(tp.batch_sharding(), local)
logits = multihost_utils.process_allgather(llama.forward(model.params, x, model.config, tp=tp), tiled=True)
ids, _ = generate(model, [1, 2, 3], max_new_tokens=3)  # replicated logits: readable on every process

# A one-device canonical checkpoint restored straight onto the two-process mesh.
back = sharding_io.restore_onto_mesh(saved, mesh, sharding.LLAMA_TP_RULES)
same = all(bool(np.array_equal(multihost_utils.process_allgather(a, tiled=True),
                               multihost_utils.process_allgather(b, tiled=True)))
           for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(model.params)))
if pid == 0:
    np.savez(out, logits=np.asarray(logits), ids=np.asarray(ids), restored_equal=same)
print(f"process {pid} done", flush=True)
