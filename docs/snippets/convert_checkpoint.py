"""Load a Hugging Face Llama/Mistral/Qwen2 checkpoint quantized on the fly, generate, save, reload."""
import tempfile
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.convert.orbax_io import restore_tree, save_tree
from lowbit_jax.convert.tokenizer import TextTokenizer
from lowbit_jax.models.generate import generate, perplexity
from lowbit_jax.nn import QuantConfig
from lowbit_jax.quant import footprint
from lowbit_jax.testing import tiny_checkpoint

work = tempfile.mkdtemp()
# Any local HF checkpoint directory works here, e.g. lowbit_jax.convert.gguf_import.smollm2_checkpoint();
# this one is a tiny random Llama (real tokenizer, random weights) so the snippet runs in seconds.
path = tiny_checkpoint(f"{work}/tiny-llama")
model = load_pretrained(path, quant=QuantConfig(quant_type="nf4", double_quant=True, min_size=0), progress=False)
fp = footprint(model.params)
print(f"{len(model.quantized_layers)} linear layers in NF4+DQ, {fp.total_bytes / 1e6:.2f} MB, {fp.bits_per_param:.2f} bits/param")

tok = TextTokenizer(path)
ids, stats = generate(model, tok.encode(tok.chat_prompt("What is a decorator?")), max_new_tokens=16)
print(repr(tok.decode(ids)), f"({stats['decode_tokens_per_s']:.0f} tokens/s)")  # random weights: random text
ppl, n, _, _ = perplexity(model, tok.encode("The assert statement checks a condition at run time."))
print(f"perplexity {ppl:.1f} over {n} tokens")

save_tree(f"{work}/params", model.params)  # orbax; the quantized tensors round-trip as they are
params = restore_tree(f"{work}/params")
print("restored:", type(params["layers"]["q_proj"]["kernel"]).__name__)
# The same from the shell: lowbit-jax convert SRC DST --quant nf4 --double-quant; lowbit-jax generate DST --chat --prompt ...
