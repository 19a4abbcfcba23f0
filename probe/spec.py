"""What a user asks fitprobe: the model and every training setting that changes memory.

The spec is the one input of every entry point (CLI, HTTP, job subprocess), so validation lives here
once, with messages that name the field and the fix.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# one definition for the library, the service and the torch-free client; modules import it from here
from fitprobe_client.units import format_bytes
from fitprobe_client.verdict import ESTIMATED  # noqa: F401
from fitprobe.probe.errors import SpecError  # modules and users import it from here too
from fitprobe.probe.gpus import gpu_capacity_bytes

MAX_SEQ_LEN = 131_072
MAX_MICRO_BATCH = 65_536
MAX_EFFECTIVE_BATCH = 1_048_576
MAX_DEVICES = 1024
MAX_SEED = 2**63  # torch.Generator.manual_seed takes a 64-bit integer
MAX_CAPACITY_BYTES = 2**60  # 1 EiB: far above any device, far below what overflows a float or int64
MAX_JSON_DEPTH = 32  # an HF config nests 3 deep; deeper is an attack on the recursion limit
MAX_JSON_ITEMS = 10_000  # values in one field (an HF config has a few hundred)
MAX_EFFECTIVE_BATCH_TOKENS = 1 << 34  # 16 Gi tokens per optimizer step: far above any published run
MAX_LENGTH_BINS = MAX_SEQ_LEN + 1  # distinct row lengths in a data profile (longer rows are cut to seq_len)
MAX_DATA_ROWS = 1 << 40  # rows per length bin
MAX_NEW_TOKENS = 1024  # a generation trial decodes every token: this bounds its forwards
MAX_EVAL_ROWS = 1 << 24  # rows of an eval set: far above a held-out split, bounds the steps it implies

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"]
# what LLM fine-tuning runs (HF `bf16=True`, Lightning "bf16-mixed"): every entry point takes it from here, and
# every answer says when it was used by default, so a forgotten --precision is not an fp32 answer in silence
DEFAULT_PRECISION: Literal["bf16-mixed"] = "bf16-mixed"
# the names users write in their framework (HF TrainingArguments.optim); probe/optimizers.py builds each
Optimizer = Literal["adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit",
                    "paged_adamw_32bit", "lion_8bit", "lion_32bit", "adafactor", "sgd"]
# before fitprobe took the frameworks' names, "adamw" was a plain torch.optim.AdamW
LEGACY_OPTIMIZER_NAMES = {"adamw": "adamw_torch"}
Mode = Literal["measure", "estimate"]
FineTuning = Literal["full", "lora"]
Collation = Literal["padded", "packed", "flattened"]
Sharding = Literal["none", "fsdp"]
Trainer = Literal["hf", "trl"]
# bitsandbytes 4-bit base weights under LoRA (QLoRA): probe/models/quantization.py
Quantization = Literal["none", "nf4", "fp4", "int8"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15, "eb": 10**18,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50, "eib": 2**60}
# ASCII digits only: float() would read "１２" (fullwidth) or "١٢" (Arabic-Indic) as 12
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)


def parse_bytes(text: str | int) -> int:
    """Parse '600MiB', '40GB', '1.5GiB' or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise SpecError(f"capacity must look like 600MiB, 40GiB or a byte count, in digits 0-9 (got {text[:40]!r})")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]  # '9'*400 is inf, not an error
    if not math.isfinite(value) or value > MAX_CAPACITY_BYTES:
        raise SpecError(f"capacity must be at most 1EiB ({MAX_CAPACITY_BYTES} bytes) (got {text[:40]!r})")
    return int(value)


def check_plain_json(value: Any) -> None:
    """Refuse what a JSON parser accepts but the service cannot store, show or recurse through.

    JSON may spell a lone UTF-16 surrogate ("\\ud800"): Python decodes it into a str that no UTF-8
    encoder accepts, so a job stored with one could never be shown again. And a config nested a
    thousand lists deep reaches the recursion limit wherever it is walked later. Walked iteratively
    here; the message says where inside the value the problem is.
    """
    pending, items = [(value, "", 0)], 0
    while pending:
        node, where, depth = pending.pop()
        at = f" at {where}" if where else ""
        items += 1
        if depth > MAX_JSON_DEPTH:
            raise SpecError(f"nested deeper than {MAX_JSON_DEPTH} levels; send a flat config")
        if items > MAX_JSON_ITEMS:
            raise SpecError(f"more than {MAX_JSON_ITEMS} values; send only the fields the model needs")
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise SpecError(f"contains a lone UTF-16 surrogate{at}, which is not text; "
                                "send valid Unicode") from None
        elif isinstance(node, dict):
            for key, child in node.items():
                pending.append((key, f"{where} (a key)" if where else "a key", depth + 1))
                pending.append((child, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(node, (list, tuple)):
            pending.extend((child, f"{where}.{i}" if where else str(i), depth + 1)
                           for i, child in enumerate(node))


# PEFT's `target_modules` value for every linear layer but the output head (QLoRA, Unsloth and Axolotl recipes)
ALL_LINEAR = "all-linear"


class LoraSpec(BaseModel):
    """LoRA adapters: only these are trained, so gradients and optimizer state shrink to them."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1, le=1024, strict=True, description="LoRA rank r")
    alpha: int = Field(16, ge=1, le=4096, strict=True, description="LoRA alpha (scaling = alpha / rank)")
    targets: list[str] | None = Field(
        None, max_length=64,
        description=f"module names to adapt, or {ALL_LINEAR} (PEFT's value: every linear layer but the output "
                    "head); default: the attention projections the model has",
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _peft_spelling(cls, value: Any) -> Any:
        """PEFT writes `target_modules="all-linear"`, a string: accepted as written."""
        return [value] if value == ALL_LINEAR else value

    @field_validator("targets")
    @classmethod
    def _all_linear_alone(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"{ALL_LINEAR} adapts every linear layer already; name no other module beside it")
        return value


class DataLengths(BaseModel):
    """The user's dataset as trials need it: how many rows have each token length.

    `fitprobe probe --data PATH` reads the file streaming on the user's machine (probe/data.py) and
    sends only this, so the service never opens a path a request names. Rows longer than seq_len are
    kept at their length here (the report quotes the data as it is) and cut to seq_len in the batches.
    """

    model_config = ConfigDict(extra="forbid")
    rows_by_length: dict[int, int] = Field(
        ..., min_length=1, max_length=MAX_LENGTH_BINS,
        description="token length → number of rows of that length (what `--data` reads from a tokenized dataset)",
    )
    source: str | None = Field(None, max_length=256, description="where the lengths came from, for the report")

    @field_validator("rows_by_length", mode="before")
    @classmethod
    def _plain_lengths_and_counts(cls, value: Any) -> Any:
        """Keys in plain decimal and counts as JSON integers: "08" next to "8" would merge silently, and a
        count of "3" or true is not a count (JSON object keys are strings; a Python caller's ints pass)."""
        if not isinstance(value, dict):
            return value
        for length, rows in value.items():
            if isinstance(length, bool) or not (isinstance(length, int) or re.fullmatch(r"0|[1-9][0-9]{0,7}", str(length))):
                raise ValueError(f"each length must be written in plain decimal digits, as --data writes it "
                                 f"(got {str(length)[:20]!r}): no sign, no leading zeros, no spaces")
            if isinstance(rows, bool) or not isinstance(rows, int):
                raise ValueError(f"each count must be a whole number of rows sent as a JSON integer "
                                 f"(got {str(rows)[:20]!r} for length {length})")
        return value

    @field_validator("rows_by_length")
    @classmethod
    def _counts_positive(cls, value: dict[int, int]) -> dict[int, int]:
        for length, rows in value.items():
            if not 0 <= length <= 1 << 22 or not 1 <= rows <= MAX_DATA_ROWS:
                raise ValueError(f"each length must be 0..{1 << 22} tokens with 1..{MAX_DATA_ROWS} rows "
                                 f"(got {rows} rows of {length} tokens)")
        return value

    @property
    def rows(self) -> int:
        return sum(self.rows_by_length.values())


class ProbeSpec(BaseModel):
    """One probe request. Every field that changes the memory of a training step is here."""

    model_config = ConfigDict(extra="forbid")

    model: str | dict[str, Any] = Field(
        "builtin:gpt-tiny",
        description="builtin:<name>, preset:<name>, hf:org/name[@revision] (a Hub model's config.json; "
        "over HTTP from the server's cache unless FITPROBE_HUB_ACCESS=online), hf:<path to config.json> "
        "(command line only), factory:pkg.mod:fn, or an inline Hugging Face config object",
    )
    seq_len: int = Field(256, strict=True, description="tokens per example; every trial uses full-length sequences")
    precision: Precision = Field(
        DEFAULT_PRECISION, description="bf16-mixed (the default, what LLM fine-tuning runs) or fp16-mixed (autocast "
        "over fp32 master weights); bf16 (bf16 weights); fp32 (no autocast)",
    )
    optimizer: Optimizer = Field(
        "adamw_torch_fused",
        description="the optimizer as your framework names it (HF TrainingArguments.optim), run as that framework "
        "runs it: adamw_torch_fused (HF's default), adamw_torch (foreach on CUDA), adamw_bnb_8bit / adamw_8bit, "
        "paged_adamw_8bit, paged_adamw_32bit (paged state counted as device memory), lion_8bit, lion_32bit, "
        "adafactor, sgd (no momentum, as HF's)",
    )
    finetuning: FineTuning = Field("full", description="full: train every weight; lora: train adapters only")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="the adapters, when finetuning is lora")
    quantization: Quantization = Field(
        "none",
        description="QLoRA: the frozen base in bitsandbytes 4-bit (nf4 or fp4, double quantization, compute dtype "
        "from precision) or 8-bit (int8: LLM.int8, measure mode only), loaded and prepared as "
        "from_pretrained(quantization_config=BitsAndBytesConfig(...)) and "
        "peft's prepare_model_for_kbit_training do; needs finetuning lora",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory per example, ~30% more compute"
    )
    collation: Collation = Field(
        "padded",
        description="how your data loader builds batches: padded (HF padding collators; a batch holding one "
        "padding token makes the model use an explicit attention mask, which costs more under grouped-query "
        "attention), packed (rows of seq_len tokens, no padding, no attention mask) or flattened (padding-free: "
        "a micro-batch's rows concatenated into one with position ids restarting per row, as HF's "
        "DataCollatorWithFlattening and TRL's padding_free make; Hugging Face models only)",
    )
    trainer: Trainer = Field(
        "hf",
        description="whose training step to run: hf (transformers Trainer: the model's own loss over the full "
        "logits) or trl (TRL SFTTrainer, loss_type nll: its fused LM head scores the hidden states in tiles, "
        "the [tokens, vocab] logits never exist; Hugging Face models only). SFTConfig defaults "
        "gradient_checkpointing to True: fitprobe runs what gradient_checkpointing says and --format trl writes it",
    )
    liger: bool = Field(
        False, description="use_liger_kernel (HF TrainingArguments / TRL SFTConfig): Liger's patches for the model's "
        "family (RMSNorm, RoPE, SwiGLU and, with trainer hf, its fused linear cross-entropy); its Triton kernels "
        "run on CUDA only, so estimate mode only (their buffers counted, the launches not run)",
    )
    data: DataLengths | None = Field(
        None, description="your dataset's row lengths: trials use the worst batch your collation builds from them "
        "(padded: the longest rows, cut at seq_len; flattened: the longest rows concatenated) instead of rows of "
        "seq_len, and the report gives the padding each collation wastes on them",
    )
    mode: Mode = Field(
        "measure",
        description="measure: real trials on the device; estimate: the same step under fake tensors, "
        "no memory used, against capacity_bytes (plan for a GPU you don't have)",
    )
    estimate_first: bool = Field(
        False, description="measure mode: estimate first and start the real search at the estimated max; "
        "the report gives the estimate's error at every real trial",
    )
    extrapolate: bool = Field(
        True, description="estimate mode: run a Hugging Face decoder cut to two shallow depths and extrapolate every "
        "moment of the step to its full depth (seconds, not minutes; equal to the full depth's count to the byte, "
        "tests/test_extrapolate.py). Models it was not verified for run at full depth and the report says why; "
        "false: always the full depth",
    )
    device: str = Field("cpu", description="cpu or cuda:N")
    capacity_bytes: int | None = Field(
        None, ge=1, strict=True,
        description="bytes the step may use: on CUDA a cap below the card (plan for a smaller GPU), "
        "on CPU the size of the virtual device (default 1 GiB)",
    )
    gpu: str | None = Field(
        None, description="estimate mode: plan for this card; sets capacity_bytes to its memory less the CUDA "
        "context (GET /v1/models lists the cards)",
    )
    headroom: float = Field(
        0.1, ge=0.0, le=0.9,
        description="fraction of capacity the safe micro-batch leaves free for fragmentation and spikes",
    )
    max_micro_batch: int | None = Field(
        None, ge=1, le=MAX_MICRO_BATCH, strict=True, description="never try a micro-batch above this"
    )
    effective_batch: int | None = Field(
        None, ge=1, le=MAX_EFFECTIVE_BATCH, strict=True,
        description="target examples per optimizer step across all devices; the search stops there",
    )
    effective_batch_tokens: int | None = Field(
        None, ge=1, le=MAX_EFFECTIVE_BATCH_TOKENS, strict=True,
        description="target tokens per optimizer step across all devices (packed or flattened collation): the "
        "plan splits it into tokens per micro-batch × accumulation × devices, exactly; instead of effective_batch",
    )
    num_devices: int = Field(1, ge=1, le=MAX_DEVICES, strict=True, description="data-parallel devices")
    sharding: Sharding = Field(
        "none",
        description="none: every device holds the whole model, gradients and optimizer state (DDP); fsdp: "
        "they are sharded over num_devices (FSDP2 fully_shard per transformer block and at the root, "
        "resharded after forward, i.e. ZeRO-3) and the answer is per device. Tensor/pipeline parallelism, "
        "hybrid sharding and CPU offload are not modelled",
    )
    eval: bool = Field(
        False, description="also answer per_device_eval_batch_size: Trainer.evaluate()'s step (forward under no_grad, "
        "labels given) beside the weights and optimizer state training keeps resident",
    )
    eval_alone: bool = Field(
        False, description="with eval: an evaluation-only job, nothing of training resident but the weights",
    )
    eval_compute_metrics: bool = Field(
        False, description="with eval: compute_metrics is set, so the trainer keeps every eval step's logits on the "
        "device; the report says how many steps fit and the eval_accumulation_steps that bounds them",
    )
    eval_rows: int | None = Field(
        None, ge=1, le=MAX_EVAL_ROWS, strict=True,
        description="with eval: rows in the eval set (the eval batch never exceeds it; steps = rows / batch)",
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=MAX_EVAL_ROWS, strict=True,
        description="with eval: the per_device_eval_batch_size your config uses; pre-flight fails unless it fits "
        "(measured: at most the max; estimated: at most the safe batch)",
    )
    generate: bool = Field(
        False, description="also answer the largest batch for model.generate (greedy, prompts of seq_len tokens, "
        "max_new_tokens each) and its KV cache, beside the weights and optimizer state training keeps resident; "
        "Hugging Face models",
    )
    generate_alone: bool = Field(
        False, description="with generate: an inference-only job, nothing of training resident but the weights",
    )
    generate_batch_size: int | None = Field(
        None, ge=1, le=MAX_EVAL_ROWS, strict=True,
        description="with generate: the batch your generation runs; pre-flight fails unless it fits (measured: at "
        "most the max; estimated: at most the safe batch)",
    )
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS, strict=True,
                                description="with generate: tokens each sequence generates")
    cache_implementation: Literal["dynamic", "static"] = Field(
        "dynamic", description="with generate: the KV cache generate uses (dynamic grows; static is allocated whole)",
    )
    micro_steps_per_trial: int = Field(2, ge=2, le=8, strict=True, description="micro-steps per optimizer step")
    optimizer_steps_per_trial: int = Field(2, ge=2, le=8, strict=True, description="optimizer steps per trial")
    seed: int = Field(0, ge=0, lt=MAX_SEED, strict=True,
                      description="seed of the synthetic batches (token ids), 0 ≤ seed < 2**63")

    @field_validator("*", mode="before")
    @classmethod
    def _plain_json(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name != "data":  # integers only, bounded by DataLengths' own bins limit
            check_plain_json(value)
        return value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _legacy_optimizer(cls, value: Any) -> Any:
        return LEGACY_OPTIMIZER_NAMES.get(value, value) if isinstance(value, str) else value

    @field_validator("seq_len")
    @classmethod
    def _seq_len_in_range(cls, value: int) -> int:
        if not 1 <= value <= MAX_SEQ_LEN:
            raise ValueError(f"seq_len must be between 1 and {MAX_SEQ_LEN} (got {value})")
        return value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value == "cuda":
            return "cuda:0"
        if value != "cpu" and not re.fullmatch(r"cuda:\d{1,2}", value):
            raise ValueError(f"device must be 'cpu' or 'cuda:N' (got {value!r})")
        return value

    @field_validator("capacity_bytes", mode="before")
    @classmethod
    def _capacity_units(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("capacity_bytes")
    @classmethod
    def _capacity_in_range(cls, value: int | None) -> int | None:
        if value is not None and value > MAX_CAPACITY_BYTES:
            raise ValueError(f"capacity_bytes must be at most 1EiB ({MAX_CAPACITY_BYTES} bytes); "
                             f"got a {value.bit_length()}-bit number")
        return value

    @model_validator(mode="after")
    def _gpu_sets_the_capacity(self) -> ProbeSpec:
        if self.gpu is None:
            return self
        if self.mode != "estimate":
            raise ValueError(f"gpu {self.gpu} plans for a card this machine does not measure: set mode to estimate "
                             "(or cap the device you have with capacity_bytes)")
        try:
            card_bytes = gpu_capacity_bytes(self.gpu)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        if self.capacity_bytes not in (None, card_bytes):
            raise ValueError(f"give gpu or capacity_bytes, not both: {self.gpu} has {format_bytes(card_bytes)} "
                             f"for tensors, capacity_bytes asks {format_bytes(self.capacity_bytes)}")
        self.capacity_bytes = card_bytes
        return self

    @model_validator(mode="after")
    def _batch_reachable(self) -> ProbeSpec:
        if self.effective_batch is not None and self.effective_batch < self.num_devices:
            raise ValueError(
                f"effective_batch ({self.effective_batch}) must be at least num_devices "
                f"({self.num_devices}): every device needs one example per step"
            )
        return self

    @model_validator(mode="after")
    def _estimate_needs_capacity(self) -> ProbeSpec:
        if self.mode == "estimate" and self.capacity_bytes is None:
            raise ValueError("estimate mode needs a capacity: set capacity_bytes (e.g. 40GiB) or gpu (a card's name)")
        if self.mode == "estimate" and self.precision == "fp16-mixed":
            raise ValueError("estimate mode cannot run fp16 loss scaling on fake tensors; estimate with "
                             "bf16-mixed, whose memory is the same")
        return self

    @model_validator(mode="after")
    def _quantization_needs_lora(self) -> ProbeSpec:
        if self.quantization != "none" and self.finetuning != "lora":
            bits = 8 if self.quantization == "int8" else 4
            raise ValueError(f"quantization {self.quantization} freezes the base weights in {bits} bits, which only "
                             "adapters can train: set finetuning lora (--lora) too, or drop quantization")
        if self.quantization != "none" and self.sharding == "fsdp":
            raise ValueError("quantization with sharding=fsdp (FSDP-QLoRA) is not modelled; use one device, or drop "
                             "quantization")
        if self.quantization == "int8" and self.mode == "estimate":
            raise ValueError("estimate mode cannot run int8 (LLM.int8): its layers split out outlier columns by "
                             "their values, which fake tensors do not have; estimate with nf4, or measure int8")
        return self

    @model_validator(mode="after")
    def _sharding_modelled(self) -> ProbeSpec:
        if self.sharding == "fsdp" and self.precision == "fp16-mixed":
            raise ValueError("sharding=fsdp is modelled with bf16-mixed, bf16 or fp32; fp16 loss scaling of "
                             "sharded gradients is not: use bf16-mixed, whose memory is the same")
        return self

    @model_validator(mode="after")
    def _collation_fits_the_rest(self) -> ProbeSpec:
        if self.collation == "flattened" and isinstance(self.model, str) and self.model.startswith(("builtin:", "factory:")):
            raise ValueError("collation flattened passes position ids that restart per row, which only Hugging Face "
                             "models take: use a preset:, hf: or inline config, or collation padded/packed")
        if self.effective_batch_tokens is not None:
            if self.effective_batch is not None:
                raise ValueError("give effective_batch (examples) or effective_batch_tokens, not both")
            if self.collation == "padded":
                raise ValueError("effective_batch_tokens counts the tokens of full rows: use collation packed or "
                                 "flattened (padded batches hold padding, so their tokens vary by batch)")
            if self.collation == "flattened" and self.data is not None:
                raise ValueError("with data, a flattened micro-batch holds as many tokens as its rows happen to: for an "
                                 "exact token budget pack rows to seq_len (collation packed), or plan effective_batch")
            tokens, row = self.effective_batch_tokens, self.seq_len
            if tokens % row:
                raise ValueError(f"effective_batch_tokens ({tokens}) must be a multiple of seq_len ({row}): each row "
                                 f"holds seq_len tokens; the nearest are {tokens // row * row or row} and "
                                 f"{(tokens // row + 1) * row}")
            if tokens // row > MAX_EFFECTIVE_BATCH:
                raise ValueError(f"effective_batch_tokens ({tokens}) is {tokens // row} rows of seq_len {row}, more than "
                                 f"{MAX_EFFECTIVE_BATCH}: lower it, or raise seq_len")
            if tokens < self.num_devices * row:
                raise ValueError(f"effective_batch_tokens ({tokens}) must be at least num_devices × seq_len "
                                 f"({self.num_devices * row}): every device trains one row per step")
        return self

    @model_validator(mode="after")
    def _eval_options_need_eval(self) -> ProbeSpec:
        given = [name for name in ("eval_alone", "eval_compute_metrics", "eval_rows", "eval_batch_size")
                 if getattr(self, name)]
        if given and not self.eval:
            raise ValueError(f"{', '.join(given)} describe the evaluation: add eval (--eval), or drop them")
        if self.eval and self.sharding == "fsdp":
            raise ValueError("eval with sharding=fsdp is not modelled yet: leave out eval, or sharding")
        return self

    @model_validator(mode="after")
    def _generate_runs_here(self) -> ProbeSpec:
        if not self.generate:
            given = [name for name in ("generate_alone", "generate_batch_size") if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} describe the generation: add generate (--generate), or drop "
                                 "them")
            return self
        if isinstance(self.model, str) and self.model.startswith(("builtin:", "factory:")):
            raise ValueError("generate runs transformers' model.generate: use a preset:, hf: or inline config")
        if self.sharding == "fsdp":
            raise ValueError("generate with sharding=fsdp is not modelled yet: leave out generate, or sharding")
        if self.seq_len + self.max_new_tokens > MAX_SEQ_LEN:
            raise ValueError(f"seq_len + max_new_tokens must be ≤ {MAX_SEQ_LEN} "
                             f"(got {self.seq_len} + {self.max_new_tokens})")
        return self

    @model_validator(mode="after")
    def _trainer_runs_here(self) -> ProbeSpec:
        hf_model = not (isinstance(self.model, str) and self.model.startswith(("builtin:", "factory:")))
        if self.trainer == "trl" and not hf_model:
            raise ValueError("trainer trl adds TRL's fused LM head to a transformers model: use a preset:, hf: or "
                             "inline config, or trainer hf")
        if self.liger and not hf_model:
            raise ValueError("liger patches transformers models by family: use a preset:, hf: or inline config, "
                             "or drop liger")
        if self.liger and self.mode != "estimate":
            raise ValueError("liger runs Triton kernels, which need a CUDA device this probe does not measure on: "
                             "add --estimate (mode estimate, with --gpu or --capacity) to count Liger's buffers, or "
                             "drop liger")
        if self.liger and self.sharding == "fsdp":
            raise ValueError("liger with sharding=fsdp is not modelled: use one device, or drop liger")
        return self

    @property
    def effective_rows(self) -> int | None:
        """The target per optimizer step in rows: effective_batch, or effective_batch_tokens in rows of seq_len."""
        if self.effective_batch_tokens is not None:
            return self.effective_batch_tokens // self.seq_len
        return self.effective_batch

    @property
    def micro_batch_limit(self) -> int | None:
        """The largest micro-batch worth trying: the user's cap, what the target batch needs, the data's rows."""
        limits = [self.max_micro_batch] if self.max_micro_batch else []
        if self.effective_batch:
            limits.append(-(-self.effective_batch // self.num_devices))
        if self.effective_batch_tokens:
            limits.append(-(-self.effective_batch_tokens // (self.num_devices * self.seq_len)))
        if self.data is not None and self.collation != "packed":  # a batch never holds more rows than the data
            limits.append(self.data.rows)
        return min(limits) if limits else None

    def device_processes(self, verify: bool = True) -> int:
        """How many device processes this job starts: one per device for a measured sharded trial or a
        verification on several devices; none for an estimate (rank 0 of a fake group, in the job).

        The one count every bound on processes reads (the door's cap, Ray's placement, the command line):
        a verification runs for any target per step, in rows or in tokens (`effective_rows`).
        """
        if self.mode != "measure":
            return 0
        verified = verify and self.effective_rows is not None and self.num_devices > 1
        return self.num_devices if self.sharding == "fsdp" or verified else 0

    def label(self) -> str:
        """Short description for tables and logs."""
        model = self.model if isinstance(self.model, str) else "hf:inline"
        extra = " lora" if self.finetuning == "lora" else ""
        extra += f" {self.quantization}" if self.quantization != "none" else ""
        extra += " ckpt" if self.gradient_checkpointing else ""
        extra += f" fsdp×{self.num_devices}" if self.sharding == "fsdp" else ""
        return f"{model} seq={self.seq_len} {self.precision} {self.optimizer}{extra}"


def validation_message(exc: Exception) -> str:
    """One line naming the field and the fix, from a pydantic ValidationError or a SpecError."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "request"
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{field}: {msg}")
        return "; ".join(parts)
    return str(exc)
