"""The bounds this service applies to a request: one source for the form, clients and the 422s."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fitprobe.app.deps import SettingsDep
from fitprobe.probe.spec import MAX_DEVICES, MAX_EFFECTIVE_BATCH, MAX_MICRO_BATCH, MAX_SEQ_LEN

router = APIRouter(prefix="/v1/limits", tags=["models"])


class Limits(BaseModel):
    max_seq_len: int = Field(description="largest seq_len (FITPROBE_MAX_SEQ_LEN)")
    max_effective_batch: int = Field(description="largest effective_batch (FITPROBE_MAX_EFFECTIVE_BATCH)")
    max_micro_batch: int = Field(description="largest max_micro_batch")
    max_devices: int = Field(description="largest num_devices in estimate mode")
    max_measured_devices_on_cpu: int = Field(description="largest num_devices measured on the CPU device "
                                             "(FITPROBE_MAX_VERIFY_PROCESSES)")


@router.get("", response_model=Limits, summary="The largest values a request may ask for on this service")
def limits(settings: SettingsDep) -> Limits:
    # the operator's bound, never above the library's own (probe/spec.py)
    return Limits(max_seq_len=min(settings.max_seq_len, MAX_SEQ_LEN),
                  max_effective_batch=min(settings.max_effective_batch, MAX_EFFECTIVE_BATCH),
                  max_micro_batch=MAX_MICRO_BATCH, max_devices=MAX_DEVICES,
                  max_measured_devices_on_cpu=settings.max_verify_processes)
