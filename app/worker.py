"""The body of a job, wherever it runs: spec in, events and one outcome out.

`execute` is the job itself, the same for every executor: it hands `("event", e)` items and then
one `("result", report)` or `("error", message)` to a `put` callable. A spec with `"kind": "whatif"`
is a what-if table (probe/whatif_spec.py) instead of a probe, one with `"kind": "recommend"` a
recommendation (probe/recommend.py); the executors need not know. Around it:

- the local executor's job process (app/executors/forked.py: forked from a process that has imported
  torch already, bound to die with the service), so a crash, an OOM-killer or a CUDA fault takes down
  that process only, and killing it is how a job is cancelled. The process leads its own process group:
  a verification or a sharded trial on several devices spawns one process per device, and the executor
  kills the whole group, so a cancel leaves none of them behind.
- `run_job_ray_task`, the Ray executor's task body: Ray already gives each job a worker process of
  its own and kills it on cancel, so it only streams the same items back, with where it ran.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fitprobe.probe.events import Event

Item = tuple[str, Any]  # ("event", event) | ("result", report) | ("error", message) | ("placed", where)


def execute(spec: dict[str, Any], allowed_factories: list[str], put: Callable[[Item], None],
            hub_offline: bool = False) -> None:
    if hub_offline:
        # FITPROBE_HUB_ACCESS=offline holds in the job too (huggingface_hub reads this when imported, below)
        os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from pydantic import ValidationError

    from fitprobe.probe.job import run_job
    from fitprobe.probe.report import Report
    from fitprobe.probe.spec import ProbeSpec, SpecError, validation_message

    if spec.get("device") == "cpu":
        # leave a core to the service: a probe on the CPU device must not starve the API it reports to
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    spec = dict(spec)
    search_from = spec.pop("search_from", None)  # a verification-only job: the routes put the cached search here

    def emit(event: Event) -> None:
        put(("event", event))

    try:
        kind = spec.pop("kind", "probe")  # app/store.py's kinds: the route stored the kind in the spec
        if kind == "whatif":
            from fitprobe.probe.whatif_spec import WhatIfSpec, run_whatif_job

            spec.pop("device", None)  # an estimate: it runs under fake tensors whichever worker claimed it
            put(("result", run_whatif_job(WhatIfSpec(**spec), emit, allowed_factories)))
            return
        if kind == "recommend":
            from fitprobe.probe.recommend import RecommendSpec, run_recommend_job

            spec.pop("device", None)  # estimates, as a what-if table's
            put(("result", run_recommend_job(RecommendSpec(**spec), emit, allowed_factories)))
            return
        cached = None if search_from is None else (search_from["probe_id"], Report.model_validate(search_from["report"]))
        # the report crosses into the service as its JSON: what the store keeps and the API answers
        put(("result", run_job(ProbeSpec(**spec), emit, allowed_factories, search_from=cached).as_json()))
    except (SpecError, ValidationError) as exc:
        put(("error", validation_message(exc)))
    except Exception as exc:  # noqa: BLE001 - reported as the job's failure, the process then exits
        put(("error", f"{type(exc).__name__}: {exc}"))


def run_job_ray_task(spec: dict[str, Any], allowed_factories: list[str], hub_offline: bool = False
                     ) -> Iterator[Item]:
    """A Ray streaming generator: first where it runs, then `execute`'s items as they happen.

    `execute` reports through a callback and a generator can only yield from its own frame, so the
    job runs in a thread and this frame yields what it puts. The report gains `placement` (node,
    process, GPUs and the task's own start and end times), so it names where its numbers come from.
    """
    import ray

    context = ray.get_runtime_context()
    placement = {"executor": "ray", "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                 "pid": os.getpid(), "gpu_ids": context.get_accelerator_ids().get("GPU", []),
                 "started_at": time.time()}
    yield "placed", placement
    items: queue.Queue[Item | None] = queue.Queue()

    def job() -> None:
        try:
            execute(spec, allowed_factories, items.put, hub_offline)
        finally:
            items.put(None)  # even if execute itself broke: the generator must not wait forever

    threading.Thread(target=job, name="fitprobe-job", daemon=True).start()
    while (item := items.get()) is not None:
        kind, payload = item
        if kind == "result":
            payload = {**payload, "placement": {**placement, "finished_at": time.time()}}
        yield kind, payload
        if kind != "event":
            return
    yield "error", "the job ended without reporting a result (see the Ray worker's log)"
