"""QLoRA on a Llama checkpoint: NF4+DQ frozen base, LoRA on q/k/v/o, adamw8bit, remat, PEFT-format adapters."""
import tempfile
import jax, jax.numpy as jnp
from lowbit_jax.convert.load import load_pretrained
from lowbit_jax.convert.tokenizer import TextTokenizer
from lowbit_jax.finetune import add_adapters, make_loss, make_step, merge_adapters, pydoc_examples, save_adapters, setup, tokenize
from lowbit_jax.nn import LoraConfig, QuantConfig, combine
from lowbit_jax.optim import adamw8bit
from lowbit_jax.testing import tiny_checkpoint

path = tiny_checkpoint(f"{tempfile.mkdtemp()}/tiny-llama")  # or smollm2_checkpoint(), or any HF Llama directory
model = load_pretrained(path, quant=QuantConfig(quant_type="nf4", double_quant=True, min_size=0), progress=False)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
params = add_adapters(model.params, lora, jax.random.key(0))  # lora_A/lora_B [layers, ...] beside each kernel

data = tokenize(pydoc_examples()[:16], TextTokenizer(path), seq_len=64)  # chat-formatted, answer tokens scored
opt = adamw8bit(1e-2)
trainable, frozen, opt_state = setup(params, opt)  # only the adapters are differentiated and optimized
step = make_step(make_loss(model.config, jnp.bfloat16, lora.scale, remat=True), opt)  # jitted, donates its state
losses = []
for epoch in range(8):
    for batch in data.batches(8, seed=epoch):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
        losses.append(float(loss))
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")

params = combine(trainable, frozen)
out = save_adapters(f"{tempfile.mkdtemp()}/adapter", params, lora, base_model=path)
print("PEFT adapter written to", out)  # adapter_model.safetensors + adapter_config.json (+ orbax/)
merged = merge_adapters(params, lora)  # W + scale * A @ B, in bf16 (requantize=True: back to NF4)
print("merged q_proj kernel:", merged["layers"]["q_proj"]["kernel"].shape, merged["layers"]["q_proj"]["kernel"].dtype)
