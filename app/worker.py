"""The body of a job's process: spec in, events and one outcome out through a queue.

It runs in a *spawned* process (a fresh interpreter, no inherited CUDA state), so a crash, an
OOM-killer or a CUDA fault takes down this process only, and killing it is how a job is cancelled.
The process leads its own process group: a verification on several devices spawns one process per
device, and the executor kills the whole group, so a cancel leaves none of them behind.
"""

from __future__ import annotations

import os
from typing import Any

from probe.lifetime import die_with_parent


def run_job_process(spec: dict[str, Any], allowed_factories: list[str], outbox: Any, hub_offline: bool = False
                    ) -> None:
    die_with_parent()
    os.setpgid(0, 0)
    if hub_offline:
        # FITPROBE_HUB_ACCESS=offline holds in the job too (huggingface_hub reads this when imported, below)
        os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from pydantic import ValidationError

    from probe.job import run_job
    from probe.spec import ProbeSpec, SpecError, validation_message

    if spec.get("device") == "cpu":
        # leave a core to the service: a probe on the CPU device must not starve the API it reports to
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    try:
        report = run_job(ProbeSpec(**spec), lambda event: outbox.put(("event", event)), allowed_factories)
        outbox.put(("result", report))
    except (SpecError, ValidationError) as exc:
        outbox.put(("error", validation_message(exc)))
    except Exception as exc:  # noqa: BLE001 - reported as the job's failure, the process then exits
        outbox.put(("error", f"{type(exc).__name__}: {exc}"))
    outbox.close()
    outbox.join_thread()
