"""The model checks every route that queues a job runs at the door: arithmetic first, then the built count.

`check_reference` (probe/models/reference.py) refuses names it does not know and sizes it can read, in microseconds;
what passes and comes from a config (inline or hf:) is then built on the meta device in the sizing
process (app/sizer.py) and its real parameter count and context bounded, whatever its fields are called.
Builtin models and presets are fixed, counted exactly by the arithmetic; factories are the operator's.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import HTTPException

from fitprobe.app.config import Settings
from fitprobe.app.sizer import Sizer, SizerBusy
from fitprobe.probe.models.bounds import check_counted, check_decode_bound
from fitprobe.probe.models.reference import (check_reference, check_seq_len, configured_layers, is_hugging_face,
                                             stored_weight_bytes)
from fitprobe.probe.spec import ProbeSpec, SpecError


def lightest_weights(specs: Iterable[ProbeSpec]) -> ProbeSpec:
    """Of the settings a job estimates (a what-if table's rows, a recommendation's candidates), the one whose
    weights take the fewest bytes: the door checks the model against the card with it, so a job is refused
    only when no row can hold even its weights (full fine-tuning's fp32 weights may not fit where QLoRA's do)."""
    specs = list(specs)
    # a quantized row of a builtin or factory model is a cell marked n/a, not a reason to refuse the others
    applicable = [spec for spec in specs if spec.quantization == "none" or is_hugging_face(spec.model)] or specs
    return min(applicable, key=lambda spec: stored_weight_bytes(spec, 1 << 20))


def built_from_a_config(spec: ProbeSpec) -> bool:
    return isinstance(spec.model, dict) or spec.model.startswith("hf:")


def check_model(spec: ProbeSpec, settings: Settings, sizer: Sizer, capacity_bytes: int | None,
                seq_lens: tuple[int, ...] = (), client: str = "") -> None:
    """422 for a model this service will not build (too large by arithmetic or by its built count, or too slow
    to build), or a seq_len (the spec's, and each of `seq_lens`) beyond its context; 429 while the sizer is busy,
    or holds as many of `client`'s configs as it takes from one client."""
    try:
        sized = built_from_a_config(spec)  # its config is read in the sizing process, which a timeout kills
        context = check_reference(spec, settings.allowed_factories, capacity_bytes, settings.model_limits,
                                  read_config=not sized)
        if sized:
            fields = {key: value for key, value in spec.model_dump(mode="json").items()
                      if key in ProbeSpec.model_fields}
            parameters, context = sizer.count(fields, client)  # the base model's: adapters were bounded by arithmetic
            check_counted(parameters, settings.model_limits, spec.seq_len, spec.micro_batch_limit)
        for seq_len in (spec.seq_len, *seq_lens):
            check_seq_len(seq_len, context)
        if spec.generate and context is not None and spec.seq_len + spec.max_new_tokens > context:
            raise SpecError(f"seq_len + max_new_tokens ({spec.seq_len} + {spec.max_new_tokens}) exceeds this model's "
                            f"context of {context} tokens; lower max_new_tokens or seq_len")
        if spec.generate and (layers := configured_layers(spec)) is not None:
            check_decode_bound(spec, layers)  # an estimated generation's decode work, bounded before the job runs
    except SpecError as exc:
        raise HTTPException(422, str(exc)) from exc
    except SizerBusy as exc:
        raise HTTPException(429, f"{exc}; retry later", headers={"Retry-After": "10"}) from exc
