"""What-if jobs: a settings × seq_len table of estimates, submitted, polled, streamed and cancelled as a probe is.

A table is many estimated probes (one search per cell, a bisection per row), minutes of work, so it
is a job on the same queue and store as probes (`kind` = whatif), never work in the request. Its
cost is bounded at the door by arithmetic on the request: at most FITPROBE_MAX_WHATIF_SEQ_LENS
columns and FITPROBE_MAX_WHATIF_CELLS cells, every seq_len within FITPROBE_MAX_SEQ_LEN, and the
model checked as a probe's is (its size, the capacity its weights need).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from fitprobe.app.config import Settings
from fitprobe.app.door import check_model, lightest_weights
from fitprobe.app.routes.estimate_jobs import Summaries, estimate_job_router
from fitprobe.app.schemas import WhatIfJob, WhatIfList
from fitprobe.app.sizer import Sizer
from fitprobe.app.store import WHATIF
from fitprobe.probe.events import EventType
from fitprobe.probe.spec import ProbeSpec, validation_message
from fitprobe.probe.whatif_spec import WhatIfSpec


def _refuse_at_the_door(request: WhatIfSpec, settings: Settings, sizer: Sizer, client: str) -> ProbeSpec:
    """422 now for a table too large for this service, or one whose every cell would fail; else its base spec."""
    columns, cells = len(request.seq_lens), request.cell_count
    if columns > settings.max_whatif_seq_lens:
        raise HTTPException(422, f"seq_lens: at most {settings.max_whatif_seq_lens} on this service (got {columns}, "
                                 "FITPROBE_MAX_WHATIF_SEQ_LENS); drop some, or submit the rest as another table")
    too_long = [s for s in request.seq_lens if s > settings.max_seq_len]
    if too_long:
        raise HTTPException(422, f"seq_lens must each be ≤ {settings.max_seq_len} on this service (got "
                                 f"{', '.join(map(str, too_long))})")
    if cells > settings.max_whatif_cells:
        rows = cells // columns
        raise HTTPException(422, f"the table has {rows} settings × {columns} seq_lens = {cells} cells, more than "
                                 f"this service's {settings.max_whatif_cells} (FITPROBE_MAX_WHATIF_CELLS); drop "
                                 "seq_lens, or narrow finetuning, checkpointing, optimizers or precisions")
    try:
        base = request.base()
    except ValueError as exc:  # SpecError and pydantic's ValidationError both are
        raise HTTPException(422, validation_message(exc)) from exc
    # what every row shares, with the lightest row's weights; a row that cannot apply (QLoRA on a builtin model, weights
    # past the card) is a cell marked n/a
    row_specs = (base.model_copy(update=setting.update()) for setting in request.settings())
    check_model(lightest_weights(row_specs), settings, sizer, base.capacity_bytes, seq_lens=tuple(request.seq_lens),
                client=client)
    return base


def _admitted(request: WhatIfSpec, settings: Settings, sizer: Sizer, client: str) -> dict[str, Any]:
    """What the job stores, once the door lets the table in."""
    base = _refuse_at_the_door(request, settings, sizer, client)
    # the card's memory is stored with its name: the job needs no card table, and a worker adds no capacity;
    # the longest-sequence search stops at this service's largest seq_len, as a request's seq_lens do
    longest = min(request.longest_up_to or settings.max_seq_len, settings.max_seq_len)
    return {**request.model_dump(mode="json"), "capacity_bytes": base.capacity_bytes, "longest_up_to": longest}


router = estimate_job_router(
    kind=WHATIF, prefix="/v1/whatif", noun="whatif", spec_model=WhatIfSpec, admit=_admitted,
    job_model=WhatIfJob, list_model=WhatIfList, answer="table", progress=EventType.WHATIF_CELL,
    summaries=Summaries(
        submit="Submit a what-if table (estimated)",
        list="List what-if jobs, newest first",
        get="A what-if job's status, progress and, once done, table",
        cancel="Cancel a queued or running what-if job",
        events="Server-Sent Events: one whatif_cell per cell; resumable with Last-Event-ID"),
    submit_description="Queue the table: which settings fit on the card, at which seq_len and micro-batch "
                       "(fake tensors, no device).")
