"""The pre-flight verdict line for jobs as the server returns them (client/fitprobe_client/verdict.py)."""

from __future__ import annotations

from fitprobe_client.verdict import verdict

PLAN = {"equation": "8 = 4 × 2 (four micro-batches of 2)", "exact": True, "effective_batch": 8,
        "micro_batch": 2, "accumulation_steps": 4, "num_devices": 1}


def test_an_estimate_jobs_verdict_says_its_plan_was_estimated_not_run_on_a_device():
    job = {"status": "succeeded", "spec": {"mode": "estimate"}, "plan": PLAN, "verification": None,
           "report": {"does_not_fit": None}}
    passed, line = verdict(job)
    assert not passed
    assert line == ("FAIL: plan not verified: 8 = 4 × 2 (four micro-batches of 2), estimated, not run on a device; "
                    "to gate on an estimate, pass --accept-estimate (API: accept_estimate: true)")
