"""HTTP request bodies: the library's spec plus what only the service needs, with its bounds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from probe.spec import MAX_EFFECTIVE_BATCH, MAX_MICRO_BATCH, ProbeSpec


class ProbeRequest(ProbeSpec):
    """A probe job. `device` is chosen by the service (the next free worker), not by the request."""

    reuse: bool = Field(True, description="answer from a finished probe with the same fingerprint when there is one")


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effective_batch: int = Field(..., ge=1, le=MAX_EFFECTIVE_BATCH, description="examples per optimizer step")
    max_micro_batch: int = Field(..., ge=1, le=MAX_MICRO_BATCH, description="largest micro-batch that fits (safe)")
    num_devices: int = Field(1, ge=1, le=1024, description="data-parallel devices")
    reference_lr: float | None = Field(None, gt=0, le=10, description="learning rate tuned at reference_batch")
    reference_batch: int | None = Field(None, ge=1, le=MAX_EFFECTIVE_BATCH, description="effective batch of reference_lr")
