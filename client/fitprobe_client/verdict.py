"""The one line a pipeline shows for a finished probe job: PASS only for a plan verified by training.

`fitprobe preflight` / `fitprobe-preflight` turn it into an exit code and `POST /v1/preflight` into an
HTTP status, so the command line and a `curl` step give the same verdict for the same job. It lives in
the client distribution (no torch) and the server imports it from there.

An estimate (`mode: estimate`, e.g. a CPU-only service gating a job for a GPU it does not have) trains
nothing, so it passes only when the caller says so (`--accept-estimate`, `accept_estimate: true`), and
then only with a margin: the plan's micro-batch must be within the safe micro-batch, the one whose
estimated peak leaves the asked headroom free, since an estimate may be off by what the headroom is
for. Its line says so: `PASS (estimated): …`.

A job that also asked for the evaluation or generation batch (`eval`, `generate`) passes only when that
fits too: at least one batch, or the `eval_batch_size` / `generate_batch_size` the caller's config runs,
beside the training state (within the safe batch for an estimate, the max for a measured job).
"""

from __future__ import annotations

from typing import Any

from fitprobe_client.status import JobStatus
from fitprobe_client.units import format_bytes

# how every entry point labels an estimate's answer: the CLI, this verdict and the page say the same
ESTIMATED = "estimated, not run on a device"


def plan_words(plan: dict[str, Any]) -> str:
    """The server's words for the split (in tokens for a token budget); a plan cached by a server older than
    `equation` gets its numbers in the same notation (probe/plan.py plan_equation)."""
    tokens = (plan.get("tokens") or {}).get("equation")
    devices = plan["num_devices"]
    return tokens or plan.get("equation") or (f"{plan['effective_batch']} = {plan['micro_batch']} micro × "
                                              f"{plan['accumulation_steps']} accum × {devices} "
                                              f"device{'s' if devices > 1 else ''}")


def verdict(job: dict[str, Any], require_exact: bool = False, accept_estimate: bool = False) -> tuple[bool, str]:
    """Whether the job's plan is met, and the `PASS: …` or `FAIL: <reason>` line that says so."""
    if job["status"] != JobStatus.SUCCEEDED:
        return False, f"FAIL: probe {job['status']}: {job.get('error') or 'no reason given'}"
    plan, verification = job.get("plan"), job.get("verification")
    not_fitting = (job.get("report") or {}).get("does_not_fit")
    if not_fitting:
        return False, f"FAIL: does not fit: {not_fitting['message']}{_on_a_cpu_service(job, not_fitting)}"
    if not plan:
        return False, "FAIL: the probe made no plan (was effective_batch sent?)"
    split = plan_words(plan)
    if verification is None:  # never "passed": nobody trained this plan
        if (job.get("spec") or {}).get("mode") == "estimate":
            if accept_estimate:
                return _estimated(job, plan, split, require_exact)
            return False, (f"FAIL: plan not verified: {split}, {ESTIMATED}; to gate on an estimate, pass "
                           "--accept-estimate (API: accept_estimate: true)")
        why = job.get("verification_note")
        return False, "FAIL: plan not verified" + (f" ({why})" if why else "")
    if not verification["passed"]:
        failed = "; ".join(f"{c['name']}: {c['detail']}" for c in verification.get("checks", []) if not c["passed"])
        return False, f"FAIL: verification failed: {failed or 'no check detail'}"
    if require_exact and not plan["exact"]:
        return False, f"FAIL: plan is not exact ({plan.get('deviation_percent')}% off): {split}"
    source = job.get("search_cached_from")
    cached = f"search cached from probe {source}; " if source else ""
    peak = (f"; peak {format_bytes(verification.get('peak_reserved_bytes'))} of "
            f"{format_bytes(verification.get('capacity_bytes'))}")
    return _with_no_grad_batches(job, f"PASS: {split} ({cached}verified{peak})", estimated=False)


# the report's section, the spec field naming the caller's batch, and the words for it
_NO_GRAD_BATCHES = (("evaluation", "eval_batch_size", "evaluation", "--eval-batch-size"),
                    ("generation", "generate_batch_size", "generation", "--generate-batch-size"))


def _with_no_grad_batches(job: dict[str, Any], line: str, estimated: bool) -> tuple[bool, str]:
    """The PASS line, unless the evaluation or generation the job asked for does not fit its batch."""
    report, spec = job.get("report") or {}, job.get("spec") or {}
    fitting = []
    for section_name, field, words, flag in _NO_GRAD_BATCHES:
        section = report.get(section_name)
        if not section:
            continue
        batch = section["batch"]
        asked = spec.get(field) or 1
        limit, which = (batch["safe"], "safe") if estimated else (batch["max"], "max")
        left = section.get("capacity_left_bytes")
        beside = f"beside {section.get('resident')}" + (f", {format_bytes(left)} left" if left is not None else "")
        if limit < asked:
            return False, (f"FAIL: {words} does not fit: batch {asked} asked, {which} {limit} ({beside}); "
                           f"lower {flag}" + (" or the training state's size" if "optimizer" in beside else ""))
        fitting.append(f"{words} batch {asked} fits ({which} {limit})")
    return True, line + "".join(f"; {words}" for words in fitting)


def _on_a_cpu_service(job: dict[str, Any], not_fitting: dict[str, Any]) -> str:
    """Why a measured "does not fit" may say nothing of the user's GPU: the service measured on its CPU device.

    The CPU device's capacity is a virtual cap the operator set (1 GiB by default), not the card the job will
    train on; the gate for a card the service does not have is an estimate against that card's memory.
    """
    spec = job.get("spec") or {}
    device = ((job.get("report") or {}).get("device") or {}).get("device")
    if device != "cpu" or spec.get("mode") == "estimate":
        return ""
    whose = "the capacity asked" if spec.get("capacity_bytes") else "the service's default, FITPROBE_CPU_CAPACITY_BYTES"
    return (f" (measured on this service's CPU device: capacity {format_bytes(not_fitting.get('capacity_bytes'))}, "
            f"{whose}; needs {format_bytes(not_fitting.get('needs_bytes'))}. To gate a job for a GPU, add "
            "--estimate --gpu <card, e.g. h100-80gb> --accept-estimate, or in the API "
            '"mode": "estimate", "gpu": "h100-80gb", "accept_estimate": true)')


def _estimated(job: dict[str, Any], plan: dict[str, Any], split: str, require_exact: bool) -> tuple[bool, str]:
    """An estimate's verdict when the caller accepts one: PASS only with the headroom kept (module docstring)."""
    report = job.get("report") or {}
    safe = (report.get("search") or {}).get("safe_micro_batch") or 0
    headroom = (job.get("spec") or {}).get("headroom", 0.1)
    capacity = format_bytes((report.get("device") or {}).get("capacity_bytes"))
    if plan["micro_batch"] > safe:
        shortfall = (report.get("headroom_shortfall") or {}).get("message") or "no micro-batch keeps it"
        return False, (f"FAIL: estimated plan {split} does not keep the {headroom:.0%} headroom of {capacity} "
                       f"({ESTIMATED}): {shortfall}")
    if require_exact and not plan["exact"]:
        return False, f"FAIL: plan is not exact ({plan.get('deviation_percent')}% off): {split}"
    return _with_no_grad_batches(job, (f"PASS (estimated): {split} ({ESTIMATED}; micro-batch {plan['micro_batch']} "
                                       f"within the safe {safe}, which keeps {headroom:.0%} of {capacity} free)"),
                                 estimated=True)
