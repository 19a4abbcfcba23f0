"""What a request may name: builtin models, shipped presets, and the GPU cards estimate mode knows."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fitprobe.probe.models.builtin_config import BUILTIN_CONFIGS
from fitprobe.probe.gpus import GPU_TOTAL_MIB, gpu_capacity_bytes
from fitprobe.probe.optimizers import KINDS
from fitprobe.probe.models.presets import PRESETS

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", summary="Model references this service builds without files, and GPU cards to estimate for")
def models() -> dict[str, Any]:
    return {
        "builtins": [f"builtin:{name}" for name in BUILTIN_CONFIGS],
        "presets": [{"model": f"preset:{name}", "model_type": model_type} for name, (model_type, _) in PRESETS.items()],
        # estimate mode plans for a card you don't have: capacity is the card's memory less the CUDA context
        "gpus": [{"name": name, "capacity_bytes": gpu_capacity_bytes(name)} for name in GPU_TOTAL_MIB],
        # the optimizer names users write in their framework (HF TrainingArguments.optim)
        "optimizers": [{"name": kind.name, "description": kind.description} for kind in KINDS.values()],
    }
