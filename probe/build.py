"""spec → (meter, model): the model built under the meter that counts it, and the facts a report gives of it.

The meter is the spec's device (or fake tensors, estimating) with its capacity; the model is built
under it, so its weights are counted like any other tensor; `trial(b)` runs THE training step at
micro-batch b and says whether it fit and at what peak. The probe (probe/job.py), the estimate
beside it (probe/estimate/estimator.py) and the what-if table (probe/whatif.py) all start here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from fitprobe.probe.devices import cpu_capacity_limit_bytes
from fitprobe.probe.estimate.fake import EstimateMeter
from fitprobe.probe.meter import Meter, make_meter
from fitprobe.probe.models.load import LoadedModel, build_model, parameter_bytes
from fitprobe.probe.spec import ProbeSpec, SpecError, format_bytes
from fitprobe.probe.report import TrialResult

Trial = Callable[[int], TrialResult]
# the spec's fields no model build reads: a build made for one spec serves every spec that differs only here
BUILD_FREE = frozenset({"seq_len", "optimizer"})


def build_key(spec: ProbeSpec) -> str:
    """The spec without BUILD_FREE: two specs with the same key run on the same model."""
    return spec.model_dump_json(exclude=set(BUILD_FREE))


def model_facts(model: LoadedModel) -> dict[str, Any]:
    params = list(model.module.parameters())
    facts: dict[str, Any] = {"parameters": sum(p.numel() for p in {id(p): p for p in params}.values()),
             "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
             "weight_bytes": parameter_bytes(model.module), "vocab_size": model.vocab_size}
    peft_config = getattr(model.module, "peft_config", None)
    if peft_config:  # the modules LoRA adapted, the model's defaults resolved: exports name them
        facts["lora_targets"] = sorted(next(iter(peft_config.values())).target_modules)
    return facts


def attention_facts(model: LoadedModel, spec: ProbeSpec) -> dict[str, Any]:
    """Which attention path the trials took: the kernel family and whether a mask was passed.

    With padded collation transformers builds an explicit mask (and repeats key/value heads under
    grouped-query attention); on a GPU that also rules out SDPA's flash kernel. The kernel SDPA
    then picks on CUDA is not recorded here: it needs a profiler run on the device.
    """
    config = getattr(model.module, "config", None)
    return {"implementation": getattr(config, "_attn_implementation", None) or "model's own",
            "mask": "explicit (padded batches)" if spec.collation == "padded" else "none (packed, causal)"}


def prepare(spec: ProbeSpec, allowed_factories: Collection[str] = (), meter: Meter | None = None
            ) -> tuple[Meter, LoadedModel]:
    """The meter for the spec's device and the model built under it (so its weights are counted)."""
    if spec.mode == "estimate":
        assert spec.capacity_bytes is not None, "ProbeSpec refuses estimate mode without a capacity"
        meter = meter or EstimateMeter(spec.capacity_bytes, gpu=spec.gpu)
    elif spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device {spec.device} requested but this torch build sees no GPU; use --device cpu "
                        "or --estimate")
    if meter is None and spec.device == "cpu" and spec.capacity_bytes:
        limit = cpu_capacity_limit_bytes()
        if spec.capacity_bytes > limit:
            raise SpecError(
                f"capacity {format_bytes(spec.capacity_bytes)} is more than this host can give a CPU probe "
                f"({format_bytes(limit)} available): the CPU device's capacity is real memory. Lower --capacity, "
                "or add --estimate to plan for a larger device without using its memory"
            )
    meter = meter or make_meter(spec.device, spec.capacity_bytes)
    if isinstance(meter, EstimateMeter):
        model = build_model(spec, "meta", allowed_factories, meter.capacity_bytes)
        with meter.tracking():
            meter.materialize(model.module)
        return meter, model
    with meter.tracking():
        model = build_model(spec, meter.device, allowed_factories, meter.capacity_bytes)
    return meter, model
