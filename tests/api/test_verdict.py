"""The pre-flight verdict line for jobs as the server returns them (client/fitprobe_client/verdict.py)."""

from __future__ import annotations

from fitprobe_client.verdict import verdict

PLAN = {"equation": "8 = 2 micro × 4 accum × 1 device", "exact": True, "effective_batch": 8,
        "micro_batch": 2, "accumulation_steps": 4, "num_devices": 1}


def test_an_estimate_jobs_verdict_says_its_plan_was_estimated_not_run_on_a_device():
    job = {"status": "succeeded", "spec": {"mode": "estimate"}, "plan": PLAN, "verification": None,
           "report": {"does_not_fit": None}}
    passed, line = verdict(job)
    assert not passed
    assert line == ("FAIL: plan not verified: 8 = 2 micro × 4 accum × 1 device, estimated, not run on a device; "
                    "to gate on an estimate, pass --accept-estimate (API: accept_estimate: true)")


def _with_evaluation(eval_max: int, eval_safe: int, asked: int | None, mode: str = "measure") -> dict:
    """A job whose plan passes, with an evaluation section as the report holds it."""
    evaluation = {"batch": {"max": eval_max, "safe": eval_safe, "trial_count": 3, "trials": []},
                  "resident": "weights and optimizer state, no gradients (as the trainer leaves them between steps)",
                  "resident_bytes": 3 << 30, "capacity_bytes": 80 << 30, "capacity_left_bytes": 77 << 30}
    verification = None if mode == "estimate" else {
        "passed": True, "checks": [], "peak_reserved_bytes": 1 << 30, "capacity_bytes": 80 << 30}
    return {"status": "succeeded", "plan": PLAN, "verification": verification,
            "spec": {"mode": mode, "eval": True, "eval_batch_size": asked, "headroom": 0.1},
            "report": {"does_not_fit": None, "evaluation": evaluation, "search": {"safe_micro_batch": 4},
                       "device": {"capacity_bytes": 80 << 30}}}


def test_a_gate_that_asks_for_the_evaluation_fails_when_its_eval_batch_does_not_fit():
    passed, line = verdict(_with_evaluation(6, 5, asked=8))
    assert not passed
    assert line.startswith("FAIL: evaluation does not fit: batch 8 asked, max 6 (beside weights and optimizer state")
    assert "77.0GiB left" in line and "lower --eval-batch-size" in line
    passed, line = verdict(_with_evaluation(6, 5, asked=6))
    assert passed and line.endswith("; evaluation batch 6 fits (max 6)")


def test_without_an_eval_batch_the_gate_asks_that_one_eval_example_fits():
    passed, line = verdict(_with_evaluation(0, 0, asked=None))
    assert not passed and "evaluation does not fit: batch 1 asked, max 0" in line


def test_an_estimated_gate_holds_the_eval_batch_to_the_safe_one():
    job = _with_evaluation(6, 5, asked=6, mode="estimate")
    passed, line = verdict(job, accept_estimate=True)
    assert not passed and "batch 6 asked, safe 5" in line
    passed, line = verdict(_with_evaluation(6, 5, asked=5, mode="estimate"), accept_estimate=True)
    assert passed and line.startswith("PASS (estimated)") and line.endswith("evaluation batch 5 fits (safe 5)")
