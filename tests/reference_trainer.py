"""A real `transformers.Trainer` run, counted by the CPU allocator's own account: the yardstick for the step
as the Trainer runs it (its `use_cache=False`, its optimizer construction, its collators).

Nothing here imports fitprobe: the model is built from a config, the rows go through the Trainer's own
collators (`DataCollatorWithFlattening` for flattened batches, the default collator for full rows), and
`Trainer.train()` runs a few optimizer steps under torch.profiler (tests/reference_loop.py's count).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from tests.reference_loop import allocator_peak_bytes


def trainer_peak_bytes(fields: dict[str, Any], *, optim: str = "adamw_torch_fused", micro_batch: int = 1,
                       seq_len: int = 64, flatten: bool = False, accumulation: int = 2, steps: int = 2,
                       seed: int = 0) -> int:
    """Peak bytes of `Trainer.train()` for `steps` optimizer steps of `accumulation` micro-batches of
    `micro_batch` rows of `seq_len` tokens each (random ids, every position a target), model build
    included, fp32 on the CPU. fitprobe's trial accumulates two micro-batches: the second forward runs
    beside the first one's gradients, as in every accumulated step."""
    from transformers import (AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening, Trainer,
                              TrainingArguments, default_data_collator)

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    generator = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(0, config.vocab_size, (seq_len,), generator=generator).tolist()}
            for _ in range(micro_batch * accumulation * steps)]
    if flatten:  # the collator makes labels (no target across a row boundary) and position ids itself
        collator = DataCollatorWithFlattening()
    else:
        rows = [{**row, "labels": row["input_ids"]} for row in rows]
        collator = default_data_collator

    def run() -> None:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(output_dir=output_dir, optim=optim, per_device_train_batch_size=micro_batch,
                                     gradient_accumulation_steps=accumulation,
                                     max_steps=steps, learning_rate=1e-4, use_cpu=True, report_to=[],
                                     save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                                     disable_tqdm=True)
            Trainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()

    return allocator_peak_bytes(run)


EVAL_WINDOW = "reference_trainer.evaluate"


def trainer_eval_peak_bytes(fields: dict[str, Any], *, eval_batch: int, seq_len: int, eval_rows: int,
                            compute_metrics: bool, train_first: bool = True, optim: str = "adamw_torch_fused",
                            seed: int = 0) -> int:
    """Peak bytes while `Trainer.evaluate()` runs (the allocator's account over its window, everything resident
    before it included), fp32 on the CPU. `train_first`: one optimizer step of one row first, so the weights and
    the optimizer state are what training leaves resident; else an evaluation-only job (weights only)."""
    from torch.profiler import record_function
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    generator = torch.Generator().manual_seed(seed)

    def rows(count: int) -> list[dict[str, list[int]]]:
        ids = [torch.randint(0, config.vocab_size, (seq_len,), generator=generator).tolist() for _ in range(count)]
        return [{"input_ids": row, "labels": row} for row in ids]

    train_rows, eval_set = rows(1), rows(eval_rows)

    def run() -> None:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(output_dir=output_dir, optim=optim, per_device_train_batch_size=1,
                                     per_device_eval_batch_size=eval_batch, max_steps=1, learning_rate=1e-4,
                                     use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                                     eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
            trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_set,
                              data_collator=default_data_collator,
                              compute_metrics=(lambda _prediction: {}) if compute_metrics else None)
            if train_first:
                trainer.train()
            with record_function(EVAL_WINDOW):
                trainer.evaluate()

    return allocator_peak_bytes(run, window=EVAL_WINDOW)
