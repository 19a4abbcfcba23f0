"""When micro-batch 1 does not fit, or fits only by eating the headroom: which setting would help.

A failed trial only says where the allocator gave up, not what the step needs. The estimate can
run the same step under fake tensors with no cap at all, so it answers both questions without
memory: the bytes micro-batch 1 needs as asked, and as it would be with each setting that shrinks
a step (gradient checkpointing, LoRA, an 8-bit optimizer, 16-bit mixed precision), alone and
together. The same options answer a search whose safe micro-batch is 0: the step fits, but only
in the headroom the user asked to keep free, and the plan runs at micro-batch 1 anyway.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fitprobe.probe.estimate.estimator import estimated_step_bytes
from fitprobe.probe import events
from fitprobe.probe.events import Emit, Phase, ignore, progress
from fitprobe.probe.optimizers import KINDS
from fitprobe.probe.report import CheapestFitting, DoesNotFit, HeadroomShortfall, SizingOption
from fitprobe.probe.spec import ProbeSpec, format_bytes

SHARDING_HINT = "or shard weights, gradients and optimizer state over several devices (--sharding fsdp --devices N)"


def _shrinking_changes(spec: ProbeSpec) -> list[tuple[str, dict[str, Any]]]:
    changes: list[tuple[str, dict[str, Any]]] = []
    if not spec.gradient_checkpointing:
        changes.append(("gradient checkpointing (--grad-checkpointing)", {"gradient_checkpointing": True}))
    if spec.finetuning == "full":
        changes.append(("LoRA (--lora)", {"finetuning": "lora"}))
    if spec.precision == "fp32":
        changes.append(("bf16 mixed precision (--precision bf16-mixed)", {"precision": "bf16-mixed"}))
    if spec.quantization == "none" and spec.sharding == "none":
        changes.append(("QLoRA (--lora --quantization nf4)", {"finetuning": "lora", "quantization": "nf4"}))
    if KINDS[spec.optimizer].bits > 8 and spec.optimizer != "sgd":
        changes.append(("8-bit AdamW (--optimizer adamw_bnb_8bit)", {"optimizer": "adamw_bnb_8bit"}))
    if len(changes) > 1:
        combined = {key: value for _, update in changes for key, value in update.items()}
        changes.append((" + ".join(label.split(" (")[0] for label, _ in changes), combined))
    return changes


def _options(spec: ProbeSpec, limit_bytes: int, allowed_factories: Collection[str], emit: Emit
             ) -> list[SizingOption]:
    """Each shrinking setting with what micro-batch 1 needs under it, and whether that is ≤ limit_bytes.

    Each is an estimate of its own (a second or more for a large model): one progress event apiece."""
    options = []
    changes = _shrinking_changes(spec)
    for done, (label, update) in enumerate(changes, 1):
        emit(progress(Phase.SIZING_THE_STEP, done, len(changes), label))
        changed = estimated_step_bytes(spec.model_copy(update=update), 1, allowed_factories)
        if changed is not None:
            options.append(SizingOption(change=label, settings=update, needs_bytes=changed,
                                        fits=changed <= limit_bytes))
    return options


def does_not_fit(spec: ProbeSpec, capacity_bytes: int, allowed_factories: Collection[str] = (),
                 emit: Emit = ignore) -> DoesNotFit:
    """The report's answer when micro-batch 1 fails: the need, the settings that fit, the card that would."""
    needs = estimated_step_bytes(spec, 1, allowed_factories)
    options = _options(spec, capacity_bytes, allowed_factories, emit)
    fitting = [o.change for o in options if o.fits]
    card_bytes = int(needs / (1 - spec.headroom)) if needs else None
    parts = [f"even micro-batch 1 does not fit in {format_bytes(capacity_bytes)} at seq_len {spec.seq_len}"]
    if needs:
        parts.append(f"the step needs {format_bytes(needs)} at micro-batch 1 (estimated)")
    if fitting:
        parts.append("it would fit with " + ", or ".join(fitting))
    if card_bytes:
        parts.append(f"or on a device with at least {format_bytes(card_bytes)} ({spec.headroom:.0%} headroom kept)")
    parts.append(SHARDING_HINT)
    cheapest = _cheapest_fitting(spec, capacity_bytes, allowed_factories, emit)
    if cheapest is not None:
        parts.append(f"the cheapest change that fits, your method kept: {cheapest.change}, at micro-batch "
                     f"{cheapest.safe_micro_batch or 1} (max {cheapest.max_micro_batch}, estimated, the first of "
                     "fitprobe recommend)")
    return DoesNotFit(needs_bytes=needs, capacity_bytes=capacity_bytes, device_bytes_needed=card_bytes,
                      options=options, cheapest_fitting=cheapest, message="; ".join(parts))


def _cheapest_fitting(spec: ProbeSpec, capacity_bytes: int, allowed_factories: Collection[str], emit: Emit
                      ) -> CheapestFitting | None:
    """probe/recommend.py's first candidate: combinations of settings, not one knob at a time."""
    from fitprobe.probe.recommend import cheapest_fitting

    emit(events.phase(Phase.RECOMMENDING))
    found = cheapest_fitting(spec.model_copy(update={"capacity_bytes": capacity_bytes}), allowed_factories, emit)
    if found is None or not found.max_micro_batch:
        return None
    return CheapestFitting(change=found.label, settings=found.settings, max_micro_batch=found.max_micro_batch,
                           safe_micro_batch=found.safe_micro_batch, extra_compute=found.extra_compute,
                           numerics=found.numerics)


def headroom_shortfall(spec: ProbeSpec, micro_batch: int, peak_bytes: int, capacity_bytes: int,
                       allowed_factories: Collection[str] = (), emit: Emit = ignore) -> HeadroomShortfall:
    """The report's words when the safe micro-batch is 0: `micro_batch` (1, which the plan then uses) fits,
    but its peak leaves less free than the headroom asked; which settings would keep it."""
    left = 1 - peak_bytes / capacity_bytes
    options = _options(spec, int(capacity_bytes * (1 - spec.headroom)), allowed_factories, emit)
    restoring = [o.change for o in options if o.fits]
    message = (f"micro-batch {micro_batch} fits but leaves only {left:.1%} headroom, under the asked "
               f"{spec.headroom:.0%} (peak {format_bytes(peak_bytes)} of {format_bytes(capacity_bytes)}); "
               + (f"the headroom comes back with {', or '.join(restoring)}; " if restoring else "")
               + SHARDING_HINT)
    return HeadroomShortfall(micro_batch=micro_batch, peak_bytes=peak_bytes, capacity_bytes=capacity_bytes,
                             headroom_left=round(left, 4), headroom_asked=spec.headroom, options=options,
                             message=message)
