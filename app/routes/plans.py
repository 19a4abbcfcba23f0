"""Synchronous plans from a known max micro-batch: arithmetic only, no device."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from fitprobe.app.deps import ClientDep
from fitprobe.app.rate import PerClientRate
from fitprobe.app.store import ClientQuota
from fitprobe.app.schemas import PlanAnswer, PlanRequest, error_responses
from fitprobe.probe.plan import make_plan
from fitprobe.probe.spec import SpecError

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post("", response_model=PlanAnswer, summary="Split an effective batch into micro-batch × accumulation × devices",
             responses=error_responses(400, 413, 422, 429))
def plan(request: PlanRequest, http: Request, client: ClientDep) -> PlanAnswer:
    rate: PerClientRate = http.app.state.plan_rate
    try:
        rate.take(client)  # a plan of a million rows costs seconds of CPU: each client gets its share
    except ClientQuota as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    if (request.reference_lr is None) != (request.reference_batch is None):
        raise HTTPException(422, "reference_lr and reference_batch go together: give both or neither")
    try:
        made = make_plan(request.effective_batch, request.max_micro_batch, request.num_devices,
                         reference_lr=request.reference_lr, reference_batch=request.reference_batch)
    except SpecError as exc:
        raise HTTPException(422, str(exc)) from exc
    return PlanAnswer(plan=made.facts())
