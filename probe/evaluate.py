"""The evaluation batch: the largest `per_device_eval_batch_size` whose step fits beside what training keeps.

A run that trains fine can die at its first evaluation. `Trainer.evaluate()` runs on the same device as
training, while the training state stays resident: the weights, the optimizer state (the trainer keeps its
optimizer for the next step) and no gradients (the step ends in `zero_grad(set_to_none=True)`). Its step is
a forward under `no_grad` in `model.eval()`, with the labels, so the model computes its loss over the full
logits (upcast to fp32 by its loss function) and nothing is saved for backward: the peak is the logits and
the loss head's buffers, not activations.

With `compute_metrics` set the trainer keeps every step's logits (and labels) on the device, concatenated
step by step (transformers' own `EvalLoopContainer`, which this runs), until `eval_accumulation_steps`
moves them to the host: memory grows with the eval set. So there are two searches, both THE search
(probe/search.py) over a trial callable: the eval batch b at one step, then at that b the number of steps
whose kept logits still fit, which is the `eval_accumulation_steps` to export. Each step's phases are
lines in the step count (one more batch of logits kept per step), so the search predicts it and confirms.

Standalone (`eval_alone`), nothing of training is resident: the evaluation-only job's answer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from fitprobe.probe.build import prepare
from fitprobe.probe.events import Emit, ignore
from fitprobe.probe.heap import frozen_heap, settle
from fitprobe.probe.meter import Meter
from fitprobe.probe.models.load import LoadedModel
from fitprobe.probe.report import EvalSearch, Evaluation, TrialResult
from fitprobe.probe.resident import ResidentRunner, announced, resident_facts, resident_words
from fitprobe.probe.search import SearchResult, find_micro_batch
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.step import IGNORE_INDEX, MicroBatch, autocast_for, worst_case_batch
from fitprobe.probe.trainers import unshifted_labels

# the most kept steps searched (each trial at k steps runs k forwards): moving logits to the host every
# 256 steps costs nothing measurable, and it bounds a measured search's forwards
MAX_KEPT_STEPS = 256


def _is_transformers_model(module: nn.Module) -> bool:
    return hasattr(getattr(module, "config", None), "model_type")


def eval_forward(model: LoadedModel, mb: MicroBatch, spec: ProbeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """One `prediction_step`: the loss and the logits, the model called as the trainer calls it in evaluation
    (labels given, `use_cache=False`, under no_grad). A plain torch model gets the cross-entropy a user writes."""
    module = model.module
    with torch.no_grad(), autocast_for(spec, mb.input_ids.device.type):
        if _is_transformers_model(module):  # its own loss function: shifts the labels, upcasts the logits
            outputs = module(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                             labels=unshifted_labels(mb.labels), use_cache=False)
            return outputs.loss.detach().mean(), outputs.logits
        logits = model.logits(module, mb.input_ids, mb.attention_mask, mb.position_ids)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), mb.labels.view(-1),
                               ignore_index=IGNORE_INDEX)
        return loss, logits


class EvalRunner(ResidentRunner):
    """`runner(b, steps) -> TrialResult`: `steps` evaluation steps at batch b beside the resident state."""

    what = "evaluation"

    def __init__(self, spec: ProbeSpec, meter: Meter, model: LoadedModel) -> None:
        super().__init__(spec, meter, model, alone=spec.eval_alone)

    def _run(self, batch: int, steps: int | None) -> TrialResult:
        from transformers.trainer_pt_utils import EvalLoopContainer

        spec, meter = self.spec, self.meter
        meter.start_trial()
        # what evaluation_loop keeps: losses always; logits and labels only when compute_metrics is set
        losses, preds, labels = (EvalLoopContainer(True, padding_index=-100) for _ in range(3))
        for _ in range(steps or 1):
            meter.phase("eval_forward")
            mb = worst_case_batch(self.model.vocab_size, batch, spec, meter.device, self._generator)
            loss, logits = eval_forward(self.model, mb, spec)
            meter.phase("eval_keep")
            losses.add(loss.repeat(batch))
            if spec.eval_compute_metrics:
                preds.add(logits)
                labels.add(unshifted_labels(mb.labels))
            del mb, loss, logits
        result = self._result(batch)
        del losses, preds, labels
        return result


def eval_steps_in_set(spec: ProbeSpec, batch: int) -> int | None:
    """Steps one evaluation takes: the eval set's rows over the batch (None: the set's size was not given)."""
    return math.ceil(spec.eval_rows / batch) if spec.eval_rows else None


def search_evaluation(spec: ProbeSpec, allowed_factories: Collection[str] = (),
                      runner: EvalRunner | None = None, emit: Emit = ignore) -> Evaluation:
    """The eval batch (max and safe) at one step, then, with compute_metrics, the steps whose kept logits fit."""
    with frozen_heap():
        if runner is None:
            meter, model = prepare(spec, allowed_factories)
            runner = EvalRunner(spec, meter, model)
            settle()
        capacity = runner.meter.capacity_bytes
        limit = spec.eval_rows or None
        search = find_micro_batch(announced(runner, "evaluation", emit), capacity, spec.headroom, limit)
        kept = None
        batch = search.safe_micro_batch or search.max_micro_batch
        if spec.eval_compute_metrics and batch:
            limit = min(eval_steps_in_set(spec, batch) or MAX_KEPT_STEPS, MAX_KEPT_STEPS)
            kept = find_micro_batch(announced(_steps_at(runner, batch), "evaluation_steps", emit), capacity,
                                    spec.headroom, limit)
    return _evaluation(spec, runner, search, kept, batch)


def _steps_at(runner: EvalRunner, batch: int) -> Callable[[int], TrialResult]:
    """A trial over the step count at a fixed batch: its record's `micro_batch` is the step count, which the
    search then finds (the batch is the section's)."""
    return lambda steps: dataclasses.replace(runner(batch, steps), micro_batch=steps)


def _section(result: SearchResult) -> EvalSearch:
    return EvalSearch(max=result.max_micro_batch, safe=result.safe_micro_batch, trial_count=len(result.trials),
                      trials=result.trials)


def _evaluation(spec: ProbeSpec, runner: EvalRunner, search: SearchResult, kept: SearchResult | None,
                batch: int) -> Evaluation:
    """The section: the batch, and with compute_metrics the steps that fit and the accumulation that bounds them."""
    steps_fit = accumulation = None
    in_set = eval_steps_in_set(spec, batch) if batch else None
    if kept is not None:
        steps_fit = kept.max_micro_batch
        safe_steps = kept.safe_micro_batch
        # the whole eval set's logits fit: nothing to move to the host
        accumulation = None if in_set is not None and safe_steps >= in_set else max(safe_steps, 1)
    return Evaluation(
        batch=_section(search), per_device_eval_batch_size=batch,
        **resident_facts(runner, "evaluation-only job" if spec.eval_alone else None),
        compute_metrics=spec.eval_compute_metrics, eval_steps=in_set if spec.eval_rows else None,
        kept_steps=_section(kept) if kept is not None else None, eval_steps_fit=steps_fit,
        eval_accumulation_steps=accumulation)


def evaluation_words(evaluation: Evaluation) -> str:
    """The section for people: the eval batch, and with compute_metrics how long its kept logits fit."""
    search = evaluation.batch
    lines = [f"eval batch: max {search.max}, safe {search.safe} ({search.trial_count} trials) beside "
             f"{resident_words(evaluation)}: per_device_eval_batch_size={evaluation.per_device_eval_batch_size}"]
    if evaluation.compute_metrics and evaluation.eval_steps_fit is not None:
        of = f" of the eval set's {evaluation.eval_steps}" if evaluation.eval_steps else ""
        plural = "" if evaluation.eval_steps_fit == 1 else "s"
        bound = (f"export eval_accumulation_steps={evaluation.eval_accumulation_steps}"
                 if evaluation.eval_accumulation_steps else "the whole eval set's logits fit")
        lines.append(f"  compute_metrics keeps every step's logits on the device: {evaluation.eval_steps_fit} step{plural}"
                     f"{of} fit; {bound}")
    return "\n".join(lines)
