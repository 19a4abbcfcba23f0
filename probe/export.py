"""A plan → the config a training framework reads. Pure functions, one per format.

Users used to copy two numbers by hand and had to know each framework's rule for the third: HF
Trainer and Axolotl take a per-device micro-batch and multiply by the world size themselves,
DeepSpeed asserts `train_batch_size == micro × accumulation × world size`, Lightning takes the
micro-batch from the DataModule. Each exporter below writes the micro-batch, the accumulation
steps, the devices and the precision the probe measured into that framework's own names.

Uneven plans. fitprobe's step can run full micro-batches plus a smaller last one; no framework can
(each runs `accumulation` micro-batches of one size). An uneven recommended plan is therefore
exported as its nearest even plan, chosen by one rule: the smaller distance to the asked effective
batch; on a tie, the one below. Both candidates use micro-batches the probe showed fit, so either
is safe; a tie goes below so the config never trains on more examples per step than asked. The
provenance states the effective batch asked, the one the config gives and the deviation: never
silently a different effective batch.

Exports must paste. An export is `{"format", "config", "provenance"}`: `config` is the framework's
object alone, so `TrainingArguments(**config)` works on it, and the provenance rides beside it,
never inside. Rendered for a file, the config is the whole text (JSON) with the provenance on
stderr, or YAML with the provenance as comments.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import yaml

from fitprobe.probe.optimizers import implementation
from fitprobe.probe.report import Evaluation, Generation, PlanFacts, Report, SplitFacts
from fitprobe.probe.spec import (ALL_LINEAR, Collation, LoraSpec, Optimizer, Precision, ProbeSpec, Quantization, SpecError,
                                 Trainer)

ExportFormat = Literal["hf", "trl", "accelerate", "deepspeed", "lightning", "axolotl", "torchtune"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)


class ExportError(SpecError):
    """A plan or setting the format cannot express; the message says what to change."""


@dataclass(frozen=True)
class Run:
    """What every exporter needs: the even split to write and the settings the probe measured."""

    micro_batch: int
    accumulation_steps: int
    num_devices: int
    precision: Precision
    gradient_checkpointing: bool
    lora: LoraSpec | None  # None: full fine-tuning
    optimizer: Optimizer
    quantization: Quantization
    collation: Collation
    seq_len: int | None  # None: `fitprobe plan` without --seq-len, which knows no row length to write
    liger: bool
    trainer: Trainer

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.accumulation_steps * self.num_devices


def framework_split(plan: PlanFacts) -> tuple[SplitFacts, str | None]:
    """The even split a framework can run, and why it differs from the plan (None if it does not)."""
    if plan.last_micro_batch is None:
        return plan, None
    asked = plan.effective_batch
    candidates = [near for near in (plan.nearest_below, plan.nearest_above) if near]
    # smaller |deviation| first; on a tie the smaller effective batch, i.e. the plan below
    chosen = min(candidates, key=lambda near: (abs(near.effective_batch - asked), near.effective_batch))
    why = (f"the recommended plan for {asked} is uneven ({plan.equation}); "
           "frameworks run equal micro-batches only, so "
           f"this config is the nearest even plan ({'below' if chosen.effective_batch < asked else 'above'}: "
           "the smaller deviation, ties go below)")
    exact_even = next((alt for alt in plan.alternatives if alt.exact and alt.last_micro_batch is None), None)
    if exact_even:
        why += (f"; an exact even split exists, {exact_even.equation}, "
                f"at {exact_even.relative_throughput:.2f}× the throughput: use it "
                "if the exact effective batch matters more than speed")
    return chosen, why


def _weights_note(run: Run) -> list[str]:
    """Precisions no mixed-precision flag expresses: the dtype the weights must be loaded in."""
    if run.precision == "bf16":
        return ["precision bf16 (pure): load the weights in bf16 (from_pretrained(..., torch_dtype=torch.bfloat16) "
                "or model.to(torch.bfloat16)); no autocast, as fitprobe measured"]
    if run.lora and run.precision in ("bf16-mixed", "fp16-mixed"):
        dtype = "bfloat16" if run.precision == "bf16-mixed" else "float16"
        return [f"LoRA with {run.precision}: load the frozen base in {dtype} (torch_dtype=torch.{dtype}) as fitprobe "
                "measured; peft keeps the adapters in fp32"]
    return []


def _checkpointing_note(run: Run) -> list[str]:
    return ["gradient checkpointing: this framework has no flag for it; call model.gradient_checkpointing_enable() "
            "(transformers) or wrap blocks in torch.utils.checkpoint"] if run.gradient_checkpointing else []


def _lora_note(run: Run) -> list[str]:
    if not run.lora:
        return []
    targets = run.lora.targets
    if not targets:  # `fitprobe plan --lora` has no model whose modules it could name
        return [f"LoRA: wrap the model with peft LoraConfig(r={run.lora.rank}, lora_alpha={run.lora.alpha}, "
                'target_modules=...) naming the modules fitprobe adapted: by default the attention projections, '
                '["q_proj", "k_proj", "v_proj", "o_proj"] in Llama, Mistral, Qwen2 and Gemma, ["c_attn"] in GPT-2']
    return [f"LoRA: wrap the model with peft LoraConfig(r={run.lora.rank}, lora_alpha={run.lora.alpha}, "
            f"target_modules={json.dumps(_peft_targets(targets))}) as fitprobe measured"]


def _peft_targets(targets: list[str]) -> list[str] | str:
    """PEFT's `target_modules`: a list of module names, or its own string "all-linear"."""
    return ALL_LINEAR if targets == [ALL_LINEAR] else list(targets)


def quantization_config(run: Run) -> dict[str, Any] | None:
    """The base's bitsandbytes settings as fitprobe loaded them, as `BitsAndBytesConfig(**d)` takes them (the
    compute dtype by name, which it accepts as a string): an object to pass, not a recipe to retype."""
    if run.quantization == "none":
        return None
    if run.quantization == "int8":
        return {"load_in_8bit": True}
    dtype = "float16" if run.precision == "fp16-mixed" else "bfloat16" if "bf16" in run.precision else "float32"
    return {"load_in_4bit": True, "bnb_4bit_quant_type": run.quantization, "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype}


def _quantization_note(run: Run) -> list[str]:
    """QLoRA: how to load and prepare the base as fitprobe measured it (no framework flag says all of it)."""
    if run.quantization == "none":
        return []
    base = "8-bit base" if run.quantization == "int8" else "QLoRA"
    return [f"{base}: load with from_pretrained(..., quantization_config=BitsAndBytesConfig(**quantization_config)), "
            "quantization_config being the object beside this note, then peft.prepare_model_for_kbit_training(model, "
            f"use_gradient_checkpointing={run.gradient_checkpointing}) before get_peft_model, as fitprobe measured"]


def _truncation_note(run: Run) -> list[str]:
    """Padded batches: fitprobe measured rows up to seq_len, so the data must be cut there too."""
    if run.collation != "padded" or not run.seq_len:
        return []
    return [f"padded rows up to {run.seq_len} tokens, as fitprobe measured: tokenize with truncation=True, "
            f"max_length={run.seq_len} (TRL SFTConfig: max_length={run.seq_len}); longer rows make larger batches"]


def _optimizer_note(run: Run) -> list[str]:
    """Frameworks without HF's `optim` names: the exact optimizer fitprobe measured, to build the same."""
    return [f"optimizer: fitprobe measured {run.optimizer} = {implementation(run.optimizer, 'cuda')}; build that "
            "one (its state and temporaries are part of the peak)"]


def _launch_note(run: Run, command: str) -> list[str]:
    return [f"launch on {run.num_devices} devices ({command}): the world size is the third factor of the "
            "effective batch"] if run.num_devices > 1 else []


def _collation_note(run: Run, loader: str) -> list[str]:
    """Frameworks without a packing switch: say what the data loader must build."""
    if run.collation == "packed":
        return [f"packed collation: {loader} must yield rows of exactly {run.seq_len} tokens (sequences packed, "
                "no padding, no attention mask), as fitprobe measured"]
    if run.collation == "flattened":
        return [f"flattened collation: {loader} must concatenate each micro-batch's rows into one with position ids "
                "restarting per row (transformers' DataCollatorWithFlattening), as fitprobe measured"]
    return []


def _hf(run: Run) -> tuple[dict[str, Any], list[str]]:
    config: dict[str, Any] = {"per_device_train_batch_size": run.micro_batch,
                              "gradient_accumulation_steps": run.accumulation_steps,
                              "bf16": run.precision == "bf16-mixed", "fp16": run.precision == "fp16-mixed",
                              "optim": run.optimizer}
    notes = (_quantization_note(run) + _weights_note(run) + _lora_note(run) + _truncation_note(run)
             + _launch_note(run, f"torchrun --nproc_per_node {run.num_devices}"))
    if run.liger:
        config["use_liger_kernel"] = True
    if run.collation == "packed":  # TRL's SFTConfig: rows of max_length tokens
        config.update(packing=True, max_length=run.seq_len)
        notes.append("packing and max_length are TRL SFTConfig fields; with a plain Trainer pack the dataset into "
                     f"rows of {run.seq_len} tokens yourself")
    elif run.collation == "flattened":  # TRL's SFTConfig: padding-free batches (DataCollatorWithFlattening)
        config.update(padding_free=True, max_length=run.seq_len)
        notes.append("padding_free is a TRL SFTConfig field; with a plain Trainer pass "
                     "data_collator=DataCollatorWithFlattening()")
    # written either way: TRL's SFTConfig turns it on by default, so a config that leaves it out trains a step
    # fitprobe did not measure. activation_checkpointing is transformers 5's name and, when set, wins without a
    # warning over gradient_checkpointing, the alias it keeps until v6 (the one TRL and transformers 4 read)
    config.update(gradient_checkpointing=run.gradient_checkpointing,
                  activation_checkpointing=run.gradient_checkpointing)
    notes.append("activation_checkpointing is transformers 5's name for gradient_checkpointing; on transformers 4 "
                 "drop activation_checkpointing")
    return config, notes


def _trl(run: Run) -> tuple[dict[str, Any], list[str]]:
    """TRL's SFTConfig for the step `--trainer trl` measured; every default that differs from it is written.

    SFTConfig's own defaults would train another step: gradient checkpointing on and bf16 on (both
    written, whatever fitprobe measured), and packing's default strategy `bfd` makes padding-free rows
    with position ids, which is fitprobe's flattened collation, not its packed one. Flattened batches
    are `padding_free` without `max_length` (SFTTrainer refuses the pair, and does not cut rows), so
    the rows must already be at most seq_len tokens; packed ones are `wrapped` rows of seq_len tokens,
    as fitprobe's packed collation is (no padding, causal across the whole row).
    """
    config: dict[str, Any] = {"per_device_train_batch_size": run.micro_batch,
                              "gradient_accumulation_steps": run.accumulation_steps,
                              "bf16": run.precision == "bf16-mixed", "fp16": run.precision == "fp16-mixed",
                              "optim": run.optimizer, "gradient_checkpointing": run.gradient_checkpointing,
                              "loss_type": "nll", "use_liger_kernel": run.liger}
    notes = (_quantization_note(run) + _weights_note(run) + _lora_note(run)
             + _launch_note(run, f"accelerate launch --num_processes {run.num_devices}"))
    if run.trainer != "trl":
        notes.append("this plan was measured with the HF Trainer's step (the full logits); SFTTrainer's fused LM "
                     "head holds other buffers: probe with --trainer trl for the step this config trains")
    if run.collation == "flattened":
        config.update(padding_free=True, max_length=None)
        notes.append(f"padding_free does not cut rows: truncate every row to {run.seq_len} tokens before "
                     "training, as fitprobe measured")
    elif run.collation == "packed":
        config.update(packing=True, packing_strategy="wrapped", max_length=run.seq_len)
    else:
        config.update(padding_free=False, max_length=run.seq_len)
    return config, notes


_ACCELERATE_PRECISION = {"fp32": "no", "bf16-mixed": "bf16", "fp16-mixed": "fp16", "bf16": "no"}


def _accelerate(run: Run) -> tuple[dict[str, Any], list[str]]:
    mixed = _ACCELERATE_PRECISION[run.precision]
    config = {
        "accelerator": {"gradient_accumulation_steps": run.accumulation_steps, "mixed_precision": mixed},
        "dataloader": {"batch_size": run.micro_batch},
        # `accelerate launch --config_file`: the keys of accelerate's ClusterConfig
        "config_file": {"compute_environment": "LOCAL_MACHINE",
                        "distributed_type": "MULTI_GPU" if run.num_devices > 1 else "NO",
                        "num_machines": 1, "machine_rank": 0, "num_processes": run.num_devices,
                        "mixed_precision": mixed, "use_cpu": False},
    }
    return config, (_quantization_note(run) + _weights_note(run) + _checkpointing_note(run) + _lora_note(run)
                    + _optimizer_note(run))


def _deepspeed(run: Run) -> tuple[dict[str, Any], list[str]]:
    """DeepSpeed's config; its `_batch_assertion` requires train_batch_size == micro × accumulation × world."""
    config = {"train_batch_size": run.effective_batch, "train_micro_batch_size_per_gpu": run.micro_batch,
              "gradient_accumulation_steps": run.accumulation_steps,
              "bf16": {"enabled": run.precision in ("bf16-mixed", "bf16")},
              # loss_scale 0: dynamic loss scaling, as fitprobe's fp16 step (GradScaler) measured
              "fp16": {"enabled": run.precision == "fp16-mixed", "loss_scale": 0}}
    notes = _quantization_note(run) + _lora_note(run) + _launch_note(run, f"deepspeed --num_gpus {run.num_devices}")
    notes.append(f"optimizer: no `optimizer` section, so HF Trainer builds optim={run.optimizer} "
                 f"({implementation(run.optimizer, 'cuda')}) as fitprobe measured; a DeepSpeed optimizer section "
                 "would replace it with DeepSpeed's own, whose memory fitprobe did not measure")
    if run.gradient_checkpointing:
        notes.append("activation checkpointing: DeepSpeed's activation_checkpointing section configures only "
                     "deepspeed.checkpointing.checkpoint; enable checkpointing on the model "
                     "(model.gradient_checkpointing_enable(), or gradient_checkpointing=True in HF Trainer)")
    if run.precision == "bf16":
        notes.append("precision bf16 (pure): DeepSpeed's bf16 mode adds fp32 master weights (4 bytes per trained "
                     "parameter) that fitprobe's pure-bf16 step did not hold; probe with bf16-mixed for a DeepSpeed "
                     "run, or check the memory")
    return config, notes


_LIGHTNING_PRECISION = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed", "bf16": "bf16-true"}


def _lightning(run: Run) -> tuple[dict[str, Any], list[str]]:
    """Sections as LightningCLI reads them: `trainer` for Trainer(...), `data` for the DataModule."""
    config = {"trainer": {"accumulate_grad_batches": run.accumulation_steps, "devices": run.num_devices,
                          "precision": _LIGHTNING_PRECISION[run.precision]},
              "data": {"batch_size": run.micro_batch}}
    # bf16-true converts the module itself; only a LoRA base in 16 bits needs loading so
    weights = _weights_note(run) if run.precision != "bf16" else []
    return config, _quantization_note(run) + weights + _checkpointing_note(run) + _lora_note(run) + _optimizer_note(run)


def _axolotl(run: Run) -> tuple[dict[str, Any], list[str]]:
    config: dict[str, Any] = {"micro_batch_size": run.micro_batch,
                              "gradient_accumulation_steps": run.accumulation_steps,
                              "bf16": run.precision == "bf16-mixed", "fp16": run.precision == "fp16-mixed",
                              "gradient_checkpointing": run.gradient_checkpointing, "optimizer": run.optimizer}
    if run.precision == "bf16":
        config["bfloat16"] = True  # axolotl's "no AMP": weights in bf16
    notes = _launch_note(run, f"accelerate launch --num_processes {run.num_devices} -m axolotl.cli.train")
    if run.collation in ("packed", "flattened"):
        # axolotl's multipack: rows of sequence_len, several sequences each, position ids restarting
        config.update(sample_packing=True, sequence_len=run.seq_len, pad_to_sequence_len=run.collation == "packed")
    elif run.seq_len:  # padded: axolotl cuts (or drops) rows longer than sequence_len, as fitprobe's batches end there
        config["sequence_len"] = run.seq_len
    if run.lora:
        config.update(adapter="qlora" if run.quantization != "none" else "lora", lora_r=run.lora.rank,
                      lora_alpha=run.lora.alpha)
        if run.quantization == "int8":
            config.update(adapter="lora", load_in_8bit=True)
        elif run.quantization != "none":
            config.update(load_in_4bit=True)
            if run.quantization != "nf4":
                notes.append(f"QLoRA with {run.quantization}: axolotl loads nf4; set bnb_4bit_quant_type "
                             f"{run.quantization} in its bnb_config_kwargs")
        if run.lora.targets == [ALL_LINEAR]:
            config["lora_target_linear"] = True  # axolotl's switch for every linear layer
        elif run.lora.targets:
            config["lora_target_modules"] = run.lora.targets
        else:  # axolotl refuses a LoRA without them, and fitprobe cannot guess a model's
            raise ExportError("axolotl needs lora_target_modules: name the modules you adapt (fitprobe plan "
                              "--lora-targets q_proj,k_proj,v_proj,o_proj or all-linear), or export a probe's plan, "
                              "which names the ones it measured")
    return config, notes


# torchtune's `optimizer` component for each optimizer it can instantiate as fitprobe measured it
_TORCHTUNE_OPTIMIZER: dict[str, dict[str, Any]] = {
    "adamw_torch_fused": {"_component_": "torch.optim.AdamW", "fused": True},
    "adamw_torch": {"_component_": "torch.optim.AdamW", "foreach": True},
    "adamw_bnb_8bit": {"_component_": "bitsandbytes.optim.AdamW8bit"},
    "adamw_8bit": {"_component_": "bitsandbytes.optim.AdamW8bit"},
    "paged_adamw_8bit": {"_component_": "bitsandbytes.optim.PagedAdamW8bit"},
    "paged_adamw_32bit": {"_component_": "bitsandbytes.optim.PagedAdamW32bit"},
    "lion_8bit": {"_component_": "bitsandbytes.optim.Lion8bit"},
    "lion_32bit": {"_component_": "bitsandbytes.optim.Lion32bit"},
    "sgd": {"_component_": "torch.optim.SGD"},
}


def _torchtune(run: Run) -> tuple[dict[str, Any], list[str]]:
    if run.precision == "fp16-mixed":
        raise ExportError("torchtune trains in fp32 or bf16 only (dtype), not fp16: probe with --precision bf16 "
                          "(or fp32) and export that plan")
    config = {"batch_size": run.micro_batch, "gradient_accumulation_steps": run.accumulation_steps,
              "enable_activation_checkpointing": run.gradient_checkpointing,
              "dtype": "fp32" if run.precision == "fp32" else "bf16",
              "optimizer": _TORCHTUNE_OPTIMIZER.get(run.optimizer)}
    notes = _launch_note(run, f"tune run --nproc_per_node {run.num_devices} <a distributed recipe>")
    if run.collation == "packed":
        config["dataset"] = {"packed": True}
        config["tokenizer"] = {"max_seq_len": run.seq_len}
    elif run.collation == "padded" and run.seq_len:  # its tokenizer truncates there, as fitprobe's batches end
        config["tokenizer"] = {"max_seq_len": run.seq_len}
    elif run.collation == "flattened":
        notes.append("torchtune has no flattening collator: its packed datasets (dataset.packed: True, "
                     f"tokenizer.max_seq_len: {run.seq_len}) are the nearest, rows of max_seq_len tokens")
    if run.precision == "bf16-mixed":
        notes.append("torchtune has no mixed precision: dtype bf16 trains pure bf16, which holds less memory than "
                     "the bf16-mixed step fitprobe measured (the micro-batch fits) but is numerically different")
    if config["optimizer"] is None:
        del config["optimizer"]
        notes += _optimizer_note(run)
    if run.quantization != "none":
        notes.append("QLoRA: use the model's qlora_ builder (e.g. model._component_: "
                     "torchtune.models.llama3_1.qlora_llama3_1_8b) with a LoRA recipe; torchtune quantizes to NF4 "
                     "with its own kernels (torchao), whose memory is close to but not what fitprobe measured")
    if run.lora:
        notes.append(f"LoRA: use a LoRA recipe (lora_finetune_single_device / lora_finetune_distributed) with "
                     f"model.lora_rank={run.lora.rank} model.lora_alpha={run.lora.alpha}")
    return config, notes


EXPORTERS: dict[str, Callable[[Run], tuple[dict[str, Any], list[str]]]] = {
    "hf": _hf, "trl": _trl, "accelerate": _accelerate, "deepspeed": _deepspeed,
    "lightning": _lightning, "axolotl": _axolotl, "torchtune": _torchtune,
}


def export_plan(plan: PlanFacts, spec: ProbeSpec, fmt: str, *, seq_len_known: bool = True,
                max_micro_batch: int | None = None, safe_micro_batch: int | None = None,
                verified: bool | None = None) -> dict[str, Any]:
    """`plan` (Plan.facts()) as `{"format", "config", "provenance"}`: `fmt`'s config and where it came from.

    `spec` holds the measured settings (precision, gradient_checkpointing, finetuning, lora, ...);
    `seq_len_known=False` (`fitprobe plan` without --seq-len) writes no row length. The probe's
    max/safe micro-batch and verification verdict go into the provenance when known.
    """
    if fmt not in EXPORTERS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    split, why_different = framework_split(plan)
    run = Run(micro_batch=split.micro_batch, accumulation_steps=split.accumulation_steps,
              num_devices=split.num_devices, precision=spec.precision,
              gradient_checkpointing=spec.gradient_checkpointing,
              lora=spec.lora if spec.finetuning == "lora" else None, optimizer=spec.optimizer,
              quantization=spec.quantization, collation=spec.collation,
              seq_len=spec.seq_len if seq_len_known else None, liger=spec.liger, trainer=spec.trainer)
    config, notes = EXPORTERS[fmt](run)
    if fmt in ("accelerate", "deepspeed", "lightning"):
        notes = notes + _collation_note(run, "your data loader")
    asked = plan.effective_batch
    provenance: dict[str, Any] = {
        "effective_batch": run.effective_batch,
        "split": f"micro_batch {run.micro_batch} × accumulation_steps {run.accumulation_steps} × "
                 f"devices {run.num_devices}",
        "effective_batch_asked": asked,
        "deviation_percent": round(100.0 * (run.effective_batch - asked) / asked, 2),
        "precision": run.precision,
    }
    quantization = quantization_config(run)
    if quantization:
        provenance["quantization_config"] = quantization
    if spec.effective_batch_tokens and run.seq_len:  # a token budget, planned in rows of seq_len
        provenance["effective_batch_tokens"] = run.effective_batch * run.seq_len
        provenance["effective_batch_tokens_asked"] = spec.effective_batch_tokens
        provenance["tokens_per_micro_batch"] = run.micro_batch * run.seq_len
    known = {"max_micro_batch": max_micro_batch, "safe_micro_batch": safe_micro_batch, "verified": verified}
    provenance.update({key: value for key, value in known.items() if value is not None})
    if why_different:
        provenance["why_not_the_plan"] = why_different
    if notes:
        provenance["notes"] = notes
    return {"format": fmt, "config": config, "provenance": provenance}


def export_report(report: Report, fmt: str) -> dict[str, Any]:
    """A probe report's plan as `fmt`'s config, with the probe's micro-batches and verdict as provenance."""
    if report.plan is None:
        raise ExportError("this probe has no plan to export: it ran without an effective batch; "
                          "run it again with one (--effective-batch / effective_batch)")
    spec = report.spec
    adapted = report.model.get("lora_targets")
    if spec.finetuning == "lora" and adapted and not spec.lora.targets:
        # the model's default targets, as the probe resolved them: the config names what was measured
        spec = spec.model_copy(update={"lora": spec.lora.model_copy(update={"targets": adapted})})
    exported = export_plan(report.plan, spec, fmt, max_micro_batch=report.search.max_micro_batch,
                           safe_micro_batch=report.search.safe_micro_batch,
                           verified=None if report.verification is None else report.verification.passed)
    if report.evaluation is not None:
        _add_evaluation(exported, report.evaluation)
    if report.generation is not None:
        _add_generation(exported, report.generation)
    return exported


def _add_evaluation(exported: dict[str, Any], evaluation: Evaluation) -> None:
    """The eval batch (and the accumulation that bounds the kept logits) where the format has the fields:
    TrainingArguments and SFTConfig; elsewhere the provenance names them for the user's evaluation loop."""
    fields: dict[str, Any] = {"per_device_eval_batch_size": evaluation.per_device_eval_batch_size}
    if evaluation.eval_accumulation_steps is not None:
        fields["eval_accumulation_steps"] = evaluation.eval_accumulation_steps
    if exported["format"] in ("hf", "trl"):
        exported["config"].update(fields)
    else:
        exported["provenance"].setdefault("notes", []).append(
            "evaluation as fitprobe measured it: " + ", ".join(f"{key} {value}" for key, value in fields.items()))
    exported["provenance"]["evaluation"] = {"max_eval_batch": evaluation.batch.max, **fields,
                                            "eval_steps_fit": evaluation.eval_steps_fit}


def _add_generation(exported: dict[str, Any], generation: Generation) -> None:
    """The generation batch and the kwargs it was searched with, in the provenance of every format.

    No training config has a field for them (SFTConfig and TrainingArguments generate nothing; GRPOConfig's
    `generation_batch_size` and `max_completion_length` belong to a different trainer), so they are what to
    pass to `model.generate` (or a GenerationConfig) in batches of `batch_size`, named once for every format.
    """
    batch = generation.batch.safe or generation.batch.max
    kwargs = {"max_new_tokens": generation.max_new_tokens, "do_sample": False,
              "cache_implementation": generation.cache_implementation}
    exported["provenance"]["generation"] = {"batch_size": batch, "max_batch": generation.batch.max,
                                            "generation_kwargs": kwargs,
                                            "longest_new_tokens_at_batch_1": generation.longest_new_tokens_at_batch_1}
    exported["provenance"].setdefault("notes", []).append(
        f"generation as fitprobe measured it: model.generate(**generation_kwargs) on batches of {batch} "
        f"prompts of {generation.prompt_tokens} tokens, generation_kwargs " +
        ", ".join(f"{key}={value!r}" for key, value in kwargs.items()))


# The part of a format's config that is the framework's file; the rest becomes comments in YAML.
_FILE_SECTION = {"accelerate": "config_file"}


def render(export: dict[str, Any], as_yaml: bool = False) -> str:
    """The text to save: the config alone as JSON, or YAML the framework loads as is (provenance as comments)."""
    config = export["config"]
    if not as_yaml:
        return json.dumps(config, indent=2, ensure_ascii=False)
    comments = provenance_text(export)
    section = _FILE_SECTION.get(export["format"])
    if section:
        others = {key: value for key, value in config.items() if key != section}
        comments += "".join(f"# {line}\n" for line in
                            yaml.safe_dump({"in_code": others}, sort_keys=False, width=100).splitlines())
        config = config[section]
    return comments + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)


def provenance_text(export: dict[str, Any]) -> str:
    """The provenance as `# ` comment lines: in a YAML file, or on stderr beside a JSON config."""
    # a note stays one line: it is read, and searched for, whole
    text = yaml.safe_dump({"fitprobe": export["provenance"]}, sort_keys=False, allow_unicode=True, width=1 << 16)
    return "".join(f"# {line}\n" for line in text.splitlines())
