"""The training loop users write, with a byte counter of its own: the yardstick for fitprobe's step.

Nothing here imports `fitprobe.probe.meter` or `fitprobe.probe.step`: the model is built the way LoRA and
mixed-precision recipes build it, the loop is the Hugging Face pattern
(`loss = model(input_ids=..., attention_mask=..., labels=...).loss / accumulation; loss.backward()`,
the outputs object dropped before backward, as HF Trainer, TRL and Axolotl do), and the counter is
a separate `TorchDispatchMode` that rounds each new storage to the CUDA allocator's 512-byte blocks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK_BYTES = 512

# Small configs of families fitprobe's code was not written against: grouped-query attention,
# sliding windows, tied and untied embeddings, soft-capped logits.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": dict(model_type="gpt2", vocab_size=3000, n_positions=256, n_embd=128, n_layer=2, n_head=4),
    "llama-gqa": dict(model_type="llama", vocab_size=4000, hidden_size=128, intermediate_size=344,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", vocab_size=4000, hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=True),
    "gemma2-sliding": dict(model_type="gemma2", vocab_size=4000, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           sliding_window=64, max_position_embeddings=512),
    "phi3": dict(model_type="phi3", vocab_size=4000, hidden_size=128, intermediate_size=256,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 max_position_embeddings=512, pad_token_id=0),
    "mistral-sliding": dict(model_type="mistral", vocab_size=4000, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                            sliding_window=64, max_position_embeddings=512),
}


def quarter_vocabulary(fields: dict[str, Any]) -> dict[str, Any]:
    """The same model on a quarter of its vocabulary, for the comparisons that really compute in bf16.

    Without AVX512-BF16 or AMX (tests/conftest.py's header says which host a run is on), torch's bf16 matmul on the
    CPU runs about 35 times slower than fp32: one 512×256 by 256×8000 product took 0.78 s against 0.022 s on a 2-core
    AVX2 host. The LM head is most of these small models' compute; both sides of a comparison build these fields."""
    return {**fields, "vocab_size": fields["vocab_size"] // 4}


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor-storage bytes, each rounded up to 512 B, while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if id(storage) not in inputs and id(storage) not in self._seen:
                    size = -(-storage.nbytes() // BLOCK_BYTES) * BLOCK_BYTES
                    self._seen.add(id(storage))
                    weakref.finalize(storage, self._drop, id(storage), size)
                    self.live += size
                    self.peak = max(self.peak, self.live)
        return out

    def _drop(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


@dataclass
class LoopSettings:
    precision: str = "fp32"  # or "bf16-mixed"
    lora: bool = False
    padded: bool = True  # one padding token in the batch (HF padding collators), else no mask at all
    micro_batch: int = 4
    seq_len: int = 64
    accumulation: int = 2
    optimizer_steps: int = 2
    optim: str = "adamw_torch_fused"  # HF TrainingArguments.optim; built by transformers' own Trainer code


def build_user_model(fields: dict[str, Any], settings: LoopSettings) -> torch.nn.Module:
    """As a fine-tuning recipe loads it: a LoRA base in bf16 under bf16-mixed, adapters by peft."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    dtype = torch.bfloat16 if settings.lora and settings.precision == "bf16-mixed" else torch.float32
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    except ValueError:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    if settings.lora:
        from peft import LoraConfig, get_peft_model

        gpt2 = config.model_type == "gpt2"
        model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=gpt2,
            target_modules=["c_attn"] if gpt2 else
            (["qkv_proj", "o_proj"] if config.model_type == "phi3" else ["q_proj", "k_proj", "v_proj", "o_proj"])))
    return model.train()


def hf_trainer_optimizer(optim: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer HF Trainer builds for `optim`: `Trainer.create_optimizer` itself, not fitprobe's code (its
    class and keyword arguments, its parameter groups, and under 8-bit bitsandbytes optimizers the
    32-bit state it registers for every nn.Embedding). Like the Trainer, it sets `model.config.use_cache`
    to False."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        # the Trainer moves the model to its device: the one the model is on already
        on_cpu = next(model.parameters()).device.type == "cpu"
        args = TrainingArguments(output_dir=output_dir, optim=optim, report_to=[], use_cpu=on_cpu, learning_rate=1e-4)
        return Trainer(model=model, args=args).create_optimizer()


def run_user_loop(fields: dict[str, Any], settings: LoopSettings, seed: int = 0,
                  make_optimizer=None) -> None:
    """The standard HF loop: model, batches, optimizer steps. Count it with either counter below."""
    model = build_user_model(fields, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params) if make_optimizer else hf_trainer_optimizer(settings.optim, model)
    train(model, optimizer, settings, seed)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: LoopSettings, seed: int = 0) -> None:
    """Batches as a padding collator makes them (one padding token, or none when packed), then the HF loop:
    `loss = model(...).loss / accumulation; loss.backward()` per micro-batch, one optimizer step each, the
    model called with `use_cache=False` as HF Trainer and TRL call it."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(settings.accumulation):
        ids = torch.randint(0, model.config.vocab_size, (settings.micro_batch, settings.seq_len), generator=generator)
        mask = None
        labels = ids
        if settings.padded:
            mask = torch.ones_like(ids)
            mask[0, -1] = 0
            labels = ids.masked_fill(mask == 0, -100)
        batches.append((ids, mask, labels))
    for _ in range(settings.optimizer_steps):
        for ids, mask, labels in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bf16-mixed"):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels,
                             use_cache=False).loss / settings.accumulation
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def user_loop_peak_bytes(fields: dict[str, Any], settings: LoopSettings, seed: int = 0) -> int:
    """Peak live bytes of the standard HF loop: model, batches, optimizer steps, all counted."""
    counter = LiveBytes()
    with counter:
        run_user_loop(fields, settings, seed)
    return counter.peak


def allocator_peak_bytes(run, window: str | None = None) -> int:
    """Peak of the CPU allocator's own account while `run()` runs: every allocation and free, kernel
    buffers included, no Python-side lifetimes (torch.profiler's memory events), each rounded up to
    the CUDA allocator's 512-byte blocks as a GPU would hold it. `window`: the peak only while the
    `record_function` of that name ran (what was live before it still counts)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    everything = prof.profiler.kineto_results.events()
    events = sorted((e for e in everything if e.name() == "[memory]"), key=lambda e: e.start_ns())
    start_ns, end_ns = 0, float("inf")
    if window is not None:
        marked = next(e for e in everything if e.name() == window)
        start_ns, end_ns = marked.start_ns(), marked.start_ns() + marked.duration_ns()
    live = peak = 0
    for event in events:
        size = -(-abs(event.nbytes()) // BLOCK_BYTES) * BLOCK_BYTES
        live += size if event.nbytes() > 0 else -size
        if start_ns <= event.start_ns() <= end_ns:
            peak = max(peak, live)
    return peak


def save_random_model(fields: dict[str, Any], directory: str) -> None:
    """A checkpoint to load as users load one: random weights, saved with save_pretrained (nothing downloaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def run_qlora_loop(checkpoint: str, settings: LoopSettings, quant_type: str = "nf4", seed: int = 0) -> None:
    """The standard QLoRA recipe: from_pretrained with BitsAndBytesConfig, prepare_model_for_kbit_training,
    get_peft_model, HF Trainer's optimizer, bf16 autocast, the HF loop."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant_type == "int8":
        quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization_config,
                                                 dtype=torch.bfloat16, device_map="cpu", attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    train(model, hf_trainer_optimizer(settings.optim, model), settings, seed)
