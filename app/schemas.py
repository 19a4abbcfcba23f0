"""HTTP bodies: the library's spec plus what only the service needs, with its bounds, and the error bodies."""

from __future__ import annotations

from typing import Any

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


class ErrorBody(BaseModel):
    """Every error the service answers (4xx, 5xx) has this body."""

    detail: str = Field(..., description="what went wrong and what to change")


class FieldError(BaseModel):
    field: str = Field(..., description="dotted path of the field in the request, e.g. lora.rank")
    message: str = Field(..., description="what is wrong with it")


class ValidationErrorBody(ErrorBody):
    """A 422: `detail` joins the messages of up to ten fields, `errors` gives them one by one."""

    errors: list[FieldError] = Field(default_factory=list, description="one entry per invalid field (at most 10)")


_ERRORS: dict[int, tuple[type[ErrorBody], str]] = {
    400: (ErrorBody, "The body is not JSON of the expected shape"),
    401: (ErrorBody, "Missing or wrong bearer token (only when the service has FITPROBE_API_TOKENS)"),
    404: (ErrorBody, "No probe with this id"),
    409: (ErrorBody, "The probe is not in a state that allows this (e.g. cancelling a finished probe)"),
    413: (ErrorBody, "The request body is larger than FITPROBE_MAX_BODY_BYTES"),
    422: (ValidationErrorBody, "A field is invalid or out of this service's bounds; the message names it"),
    429: (ErrorBody, "Too many probes are queued; retry after the Retry-After header's seconds"),
    503: (ErrorBody, "Not ready: the store does not answer or no device worker runs"),
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these status codes, each with the body the service really sends."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model, description = _ERRORS[code]
        responses[code] = {"model": model, "description": description}
        if code == 429:
            responses[code]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                          "schema": {"type": "integer"}}}
    return responses
