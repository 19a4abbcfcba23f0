"""A finished probe's plan as a training framework's config (probe/export.py does the work)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import ValidationError

from fitprobe.app.deps import StoreDep
from fitprobe.app.schemas import ConfigExport
from fitprobe_client.status import JobStatus
from fitprobe.probe.export import FORMATS, ExportError, ExportFormat, export_report
from fitprobe.probe.report import Report

router = APIRouter(prefix="/v1/probes", tags=["probes"])


@router.get("/{job_id}/config", response_model=ConfigExport,
            summary="The probe's plan as HF, Accelerate, DeepSpeed, Lightning, Axolotl or torchtune config "
                    "(`config`, to unpack as is) and its provenance beside it",
            responses={404: {"description": "no probe with this id"},
                       409: {"description": "the probe has not succeeded, or ran without an effective batch"},
                       422: {"description": f"format is not one of {', '.join(FORMATS)}, or the format cannot "
                                             "express the probe's settings"}})
def probe_config(job_id: str, store: StoreDep,
                 format: Annotated[ExportFormat, Query(description="the framework whose config to return")]
                 ) -> dict[str, Any]:
    try:
        job = store.get(job_id)
    except KeyError:
        raise HTTPException(404, f"no probe with id {job_id!r}") from None
    if job["status"] != JobStatus.SUCCEEDED:
        raise HTTPException(409, f"probe {job_id} is {job['status']}: its config exists once it has succeeded")
    not_fitting = (job["result"] or {}).get("does_not_fit")
    if not_fitting:
        raise HTTPException(409, f"probe {job_id} has no plan: {not_fitting['message']}")
    if not (job["result"] or {}).get("plan"):
        raise HTTPException(409, f"probe {job_id} has no plan: it ran without an effective_batch; submit it again "
                                 "with one (the same probe is answered from the cache)")
    try:
        report = Report.model_validate(job["result"])
    except ValidationError:
        raise HTTPException(409, f"probe {job_id}'s report was stored by an older fitprobe in another shape: submit "
                                 "it again with reuse=false") from None
    try:
        return export_report(report, format)
    except ExportError as exc:
        raise HTTPException(422, str(exc)) from exc
