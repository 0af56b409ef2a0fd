import re, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, "benchmarks")
import bench_sharded as bs
from lowbit_jax import sharding
from lowbit_jax.models import llama
p = dict(bs.PRESETS[sys.argv[1]], layers=int(sys.argv[2]))
cfg = bs._config(p)
mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp"))
tp = sharding.TensorParallel(mesh, sharding.LLAMA_TP_RULES + ((r"\['lm_head'\]", "out"),), "tp", batch_axis="dp")
params = bs.build_params(cfg, tp, jax.random.key(0))
cache = jax.device_put(llama.init_cache(cfg, 1, p["prompt"] + 8, jnp.bfloat16), tp.cache_sharding())
tok = jnp.asarray([[7]], jnp.int32)
llama.LAYER_INDEXED_DECODE = True
txt = llama.decode_step.lower(params, tok, cache, p["prompt"], cfg, jnp.bfloat16, tp=tp).compile().as_text()
open(sys.argv[3], "w").write(txt)
def size(shape):
    m = re.match(r"(\w+)\[([\d,]*)\]", shape)
    if not m: return 0
    n = 1
    for d in m.group(2).split(","):
        if d: n *= int(d)
    return n
for l in txt.splitlines():
    l = l.strip()
    m = re.match(r"(ROOT )?%(\S+) = (\S+\[[\d,]*\])\S* (copy|copy-start|dynamic-slice|custom-call|while)\(", l)
    if m and (size(m.group(3)) > 100000 or m.group(4) in ("while",)):
        print(l[:260])
