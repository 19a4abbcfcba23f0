"""Probe jobs over HTTP: the paths users and pipelines take.

Against a real uvicorn server (`server`) where the wire matters: event streams, killed processes, a
restart, binding. What a route answers (validation, 404s, pagination, the cache, the queue's limit,
tokens) runs in process (`client`, `in_process`), which starts in a fraction of a second, not 15.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.api.conftest import FAST_JOB, HURRIED_SLEEPY_JOBS, SLOW_JOB, gone, in_process, start_server, wait_for


def test_submit_poll_and_stream_a_probe_to_success(server):
    with server.client() as client:
        response = client.post("/v1/probes", json={**FAST_JOB, "reuse": False})
        assert response.status_code == 202
        assert response.headers["location"] == f"/v1/probes/{response.json()['id']}"
        job = wait_for(client, response.json()["id"], ("succeeded", "failed"))
        assert job["status"] == "succeeded", job["error"]
        assert job["report"]["search"]["max_micro_batch"] >= job["report"]["search"]["safe_micro_batch"] >= 1
        assert job["plan"]["effective_batch"] == 24 and job["plan"]["exact"]
        assert job["verification"]["passed"]
        assert len(job["trials"]) == job["report"]["search"]["trial_count"]

        with client.stream("GET", f"/v1/probes/{job['id']}/events") as stream:
            lines = [line for line in stream.iter_lines()]
        ids = [int(line.split(": ")[1]) for line in lines if line.startswith("id: ")]
        names = [line.split(": ")[1] for line in lines if line.startswith("event: ")]
        assert names.count("trial") == len(job["trials"]) and names[-1] == "end"
        # resume: only what came after the given id
        with client.stream("GET", f"/v1/probes/{job['id']}/events",
                           headers={"Last-Event-ID": str(ids[2])}) as stream:
            resumed = [int(line.split(": ")[1]) for line in stream.iter_lines() if line.startswith("id: ")]
        assert resumed == ids[3:]


def test_same_probe_again_is_answered_from_cache_with_a_new_plan(client):
    first = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    # a smaller batch than the search went to: its plan is new, so it has no verification yet
    again = client.post("/v1/probes", json={**FAST_JOB, "effective_batch": 12}).json()
    assert again["status"] == "succeeded" and again["cached"] is True
    assert again["report"]["search"]["max_micro_batch"] == first["report"]["search"]["max_micro_batch"]
    assert again["plan"]["effective_batch"] == 12
    assert again["verification"] is None and "reuse=false" in again["verification_note"]
    fresh = client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()
    assert fresh["status"] == "queued" and fresh["cached"] is False
    wait_for(client, fresh["id"], ("succeeded",))


def test_cancel_kills_the_job_process_and_frees_the_device(server):
    with server.client() as client:
        slow = client.post("/v1/probes", json=SLOW_JOB).json()
        running = wait_for(client, slow["id"], ("running",), predicate=lambda j: j["worker_pid"])
        pid = running["worker_pid"]
        cancelled = client.delete(f"/v1/probes/{slow['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.delete(f"/v1/probes/{slow['id']}").status_code == 409
        next_job = client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()
        assert wait_for(client, next_job["id"], ("succeeded", "failed"))["status"] == "succeeded"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_killed_job_process_fails_its_job_with_the_reason_and_the_service_goes_on(server):
    with server.client() as client:
        slow = client.post("/v1/probes", json=SLOW_JOB).json()
        running = wait_for(client, slow["id"], ("running",), predicate=lambda j: j["worker_pid"])
        os.kill(running["worker_pid"], signal.SIGKILL)
        failed = wait_for(client, slow["id"], ("failed",))
        assert "SIGKILL" in failed["error"]
        assert client.get("/healthz").status_code == 200
        next_job = client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()
        assert wait_for(client, next_job["id"], ("succeeded",))["status"] == "succeeded"


def test_a_killed_fork_server_fails_its_running_job_and_the_next_job_gets_a_new_one(server):
    """Jobs are forked from a fork server with torch imported (app/executors/forked.py). The OOM-killer may pick
    it (it is large): its running job dies with it, with the reason, and the next job starts from a new one."""
    import psutil

    with server.client() as client:
        slow = client.post("/v1/probes", json=SLOW_JOB).json()
        running = wait_for(client, slow["id"], ("running",), predicate=lambda j: j["worker_pid"])
        job_process = psutil.Process(running["worker_pid"])
        fork_server = job_process.parent()
        assert fork_server is not None and fork_server.parent().pid == server.process.pid, \
            "the job is forked by a child of the service, not started by the service itself"
        fork_server.kill()
        failed = wait_for(client, slow["id"], ("failed",))
        assert "died with the fork server" in failed["error"]
        assert gone(job_process), "the job outlived its fork server"
        next_job = client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()
        done = wait_for(client, next_job["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]


@pytest.mark.parametrize("body,field", [
    ({**FAST_JOB, "seq_len": 0}, "seq_len"),
    ({**FAST_JOB, "precision": "fp8"}, "precision"),
    ({**FAST_JOB, "colour": "red"}, "colour"),
    ({**FAST_JOB, "seq_len": 10**6}, "seq_len"),
    ({**FAST_JOB, "model": "factory:os:system"}, "factory"),
    ({**FAST_JOB, "model": "hf:/etc/passwd"}, "hf:"),
    ({**FAST_JOB, "effective_batch": 0}, "effective_batch"),
])
def test_bad_input_is_a_422_that_names_the_field(client, body, field):
    response = client.post("/v1/probes", json=body)
    assert response.status_code == 422
    assert field in response.json()["detail"]
    assert "Traceback" not in response.text


def test_unknown_model_is_refused_at_the_door_with_the_valid_names(client):
    response = client.post("/v1/probes", json={**FAST_JOB, "model": "builtin:nope"})
    assert response.status_code == 422 and "choose one of: gpt-nano" in response.json()["detail"]


def test_unknown_ids_are_404_and_lists_filter_and_paginate(client):
    assert client.get("/v1/probes/nope").status_code == 404
    assert client.delete("/v1/probes/nope").status_code == 404
    # jobs of its own, so that it passes alone too: two succeeded (the second answered from the cache of
    # the first) and one cancelled, which the status filter must leave out
    wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    assert client.post("/v1/probes", json=FAST_JOB).json()["status"] == "succeeded"
    cancelled = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
    assert client.delete(f"/v1/probes/{cancelled}").json()["status"] == "cancelled"
    page = client.get("/v1/probes", params={"status": "succeeded", "limit": 1}).json()
    assert len(page["items"]) == 1 and page["total"] >= 2
    assert all(j["status"] == "succeeded" for j in page["items"])
    assert client.get("/v1/probes", params={"status": "bogus"}).status_code == 422


def test_plans_devices_and_metrics(client):
    plan = client.post("/v1/plans", json={"effective_batch": 64, "max_micro_batch": 24}).json()["plan"]
    assert plan["micro_batch"] * plan["accumulation_steps"] == 64
    bad = client.post("/v1/plans", json={"effective_batch": 1, "max_micro_batch": 4, "num_devices": 2})
    assert bad.status_code == 422 and "num_devices" in bad.json()["detail"]
    devices = client.get("/v1/devices").json()["devices"]
    assert devices[0]["device"] == "cpu"
    metrics = client.get("/metrics").text
    assert 'fitprobe_jobs{status="succeeded"}' in metrics and "fitprobe_queue_depth" in metrics
    assert "fitprobe_trials_per_job_count" in metrics


def test_a_full_queue_answers_429_with_retry_after(tmp_path):
    with in_process(tmp_path / "data", max_queued_jobs="1") as client:
        running = client.post("/v1/probes", json=SLOW_JOB).json()
        wait_for(client, running["id"], ("running",))
        assert client.post("/v1/probes", json=SLOW_JOB).status_code == 202
        refused = client.post("/v1/probes", json=SLOW_JOB)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0


def test_a_killed_server_keeps_its_jobs_and_finishes_them_after_restart(tmp_path):
    """And the job's temporary directory, which the killed server could not remove, goes at the restart; what is
    not a job directory of this service's database stays."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "a-users-file").write_text("kept")
    (scratch / "fitprobe-job-0123456789abcdef-x1").mkdir()  # another database's job: not this service's to remove
    server = start_server(tmp_path / "data", scratch_dir=str(scratch))
    port = server.url.rsplit(":", 1)[1]
    with server.client() as client:
        job = client.post("/v1/probes", json={**SLOW_JOB, "effective_batch": 24}).json()
        wait_for(client, job["id"], ("running",))
    server.kill()
    left = [p.name for p in scratch.iterdir() if p.name.startswith(f"fitprobe-job-{job['id']}-")]
    assert left, "the killed server's job had no directory of its own"
    restarted = start_server(tmp_path / "data", port=int(port), env=HURRIED_SLEEPY_JOBS, scratch_dir=str(scratch))
    try:
        with restarted.client() as client:
            assert client.get(f"/v1/probes/{job['id']}").status_code == 200
            done = wait_for(client, job["id"], ("succeeded", "failed"), timeout_s=300)
            assert done["status"] == "succeeded", done["error"]
        assert not any((scratch / name).exists() for name in left), "the killed run's directory is still there"
        assert sorted(p.name for p in scratch.iterdir()) == ["a-users-file", "fitprobe-job-0123456789abcdef-x1"]
    finally:
        restarted.stop()


def test_tokens_are_required_when_configured(tmp_path):
    with in_process(tmp_path / "data", api_tokens="s3cret,other") as client:
        assert client.get("/v1/probes").status_code == 401
        assert client.get("/v1/probes", headers={"Authorization": "Bearer other"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_binding_beyond_loopback_without_tokens_is_refused(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fitprobe.app.cli", "serve", "--host", "0.0.0.0", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FITPROBE_API_TOKENS": ""})
    assert run.returncode != 0 and "FITPROBE_API_TOKENS" in run.stderr
