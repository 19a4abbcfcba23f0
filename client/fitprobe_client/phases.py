"""A job's phase events in words, once each: the one reading `fitprobe` and `fitprobe-preflight` print.

A phase that repeats (the does-not-fit sizing emits one event per setting it tries) is worth a line
only when it says something new: the setting being sized, with how many are left.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fitprobe_client.units import format_bytes

PHASE_WORDS = {
    "queued": "queued: waiting for a free device",
    "scheduling": "scheduling on the cluster",
    "placed": "placed on a device",
    "building_model": "building the model",
    "building_cut": "building the model cut to two shallow depths (the estimate extrapolates to full depth)",
    "tracing_sizes": "tracing allocation sizes to replay the other cells",
    "probing": "searching for the largest micro-batch that fits",
    "estimating": "estimating under fake tensors (no memory used)",
    "sizing_the_step": "sizing the step: what micro-batch 1 needs under each setting that saves memory",
    "counting_flops": "counting each setting's step FLOPs on the traced step (what it costs in compute)",
    "recommending": "nothing fits as asked: estimating combinations of settings, cheapest first, until one fits",
    "search_cached": "reusing a cached search: only the plan is trained",
    "planning": "planning the split of the effective batch",
    "verifying": "verifying the plan by training it",
    "generation": "searching for the largest model.generate batch with its KV cache",
    "evaluation": "searching for the largest eval batch beside the resident training state",
}


def phase_words(event: Mapping[str, Any]) -> str:
    """'sizing the step 2/6: LoRA (--lora)': the phase, and the option it is on when it has one."""
    phase = str(event.get("phase"))
    words = PHASE_WORDS.get(phase, phase.replace("_", " "))
    if "option" in event:
        words = words.split(":")[0]
        return f"{words} {event.get('done')}/{event.get('total')}: {event['option']}"
    return words


class PhaseLines:
    """A phase event's words, or None when they are the words given last (one line per phase)."""

    def __init__(self) -> None:
        self._last: str | None = None

    def __call__(self, event: Mapping[str, Any]) -> str | None:
        words = phase_words(event)
        if words == self._last:
            return None
        self._last = words
        return words


def trial_outcome(event: Mapping[str, Any]) -> str:
    """'fits, peak 12.0MiB' or 'out of memory at 15.2MiB while allocating 2.0MiB': only the numbers the
    trial has (an estimate's refusal may know neither where it stopped nor what it asked for)."""
    if event.get("fits"):
        return f"fits, peak {format_bytes(event.get('peak_allocated_bytes'))}"
    return "out of memory" + oom_words(event.get("oom_live_bytes"), event.get("oom_request_bytes"))


# a batch_trial event's search: what its size counts
BATCH_SEARCH_WORDS = {"evaluation": "eval batch", "evaluation_steps": "eval steps with kept logits",
                      "generation": "generate batch", "generation_length": "generate batch 1, new tokens"}


def batch_trial_words(event: Mapping[str, Any]) -> str:
    """'generate batch 8: fits, peak 61.0GiB': one trial of the evaluation or generation search."""
    search = str(event.get("search"))
    if event.get("fits"):
        outcome = f"fits, peak {format_bytes(event.get('peak_allocated_bytes'))}"
    else:
        outcome = "does not fit" + (f" ({event['error']})" if event.get("error") else "")
    return f"{BATCH_SEARCH_WORDS.get(search, search)} {event.get('size')}: {outcome}"


def oom_words(live_bytes: int | None, request_bytes: int | None) -> str:
    """' at 15.2MiB while allocating 2.0MiB', or the part of it that is known, or nothing."""
    words = f" at {format_bytes(live_bytes)}" if live_bytes is not None else ""
    return words + (f" while allocating {format_bytes(request_bytes)}" if request_bytes is not None else "")
