"""The one line a pipeline shows for a finished probe job: PASS only for a plan verified by training.

`fitprobe preflight` / `fitprobe-preflight` turn it into an exit code and `POST /v1/preflight` into an
HTTP status, so the command line and a `curl` step give the same verdict for the same job. It lives in
the client distribution (no torch) and the server imports it from there.
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


def verdict(job: dict[str, Any], require_exact: bool = False) -> tuple[bool, str]:
    """Whether the job's plan is met, and the `PASS: …` or `FAIL: <reason>` line that says so."""
    if job["status"] != JobStatus.SUCCEEDED:
        return False, f"FAIL: probe {job['status']}: {job.get('error') or 'no reason given'}"
    plan, verification = job.get("plan"), job.get("verification")
    not_fitting = (job.get("report") or {}).get("does_not_fit")
    if not_fitting:
        return False, f"FAIL: does not fit: {not_fitting['message']}"
    if not plan:
        return False, "FAIL: the probe made no plan (was effective_batch sent?)"
    split = plan_words(plan)
    if verification is None:  # never "passed": nobody trained this plan
        if (job.get("spec") or {}).get("mode") == "estimate":
            return False, f"FAIL: plan not verified: {split}, {ESTIMATED}"
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
    return True, f"PASS: {split} ({cached}verified{peak})"
