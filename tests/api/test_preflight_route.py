"""`POST /v1/preflight` as a CI step calls it: `curl --fail-with-body`, one verdict line, a status curl acts on."""

from __future__ import annotations

import subprocess

import pytest

from tests.api.conftest import SLOW_JOB

NANO = {"model": "builtin:gpt-nano", "seq_len": 32, "capacity_bytes": 16 << 20}


def curl(url: str, body: str, *headers: str) -> subprocess.CompletedProcess:
    """The step a pipeline runs: a 4xx or 5xx makes curl exit 22 and still print the body."""
    header_args = [arg for header in ("content-type: application/json", *headers) for arg in ("-H", header)]
    return subprocess.run(["curl", "-sS", "--fail-with-body", "-XPOST", f"{url}/v1/preflight", *header_args,
                           "-d", body], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_verified_plan_answers_200_and_one_pass_line(server):
    run = curl(server.url, '{"model": "builtin:gpt-nano", "seq_len": 32, "capacity_bytes": 16777216, '
                           '"effective_batch": 20, "reuse": false}')
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("PASS: 20 = ") and "(verified; peak " in run.stdout, run.stdout
    assert len(run.stdout.splitlines()) == 1


@pytest.mark.slow
def test_a_plan_that_cannot_be_met_answers_409_so_curl_fails_the_step_and_prints_why(server):
    # 1 MB is less than micro-batch 1 of gpt-nano needs
    run = curl(server.url, '{"model": "builtin:gpt-nano", "seq_len": 32, "capacity_bytes": 1000000, '
                           '"effective_batch": 8}')
    assert run.returncode == 22 and "409" in run.stderr, (run.stdout, run.stderr)
    assert run.stdout.startswith("FAIL: does not fit: even micro-batch 1 does not fit"), run.stdout


def test_a_cached_does_not_fit_answers_the_same_409_fail_line_again(server):
    body = '{"model": "builtin:gpt-nano", "seq_len": 32, "capacity_bytes": 1000000, "effective_batch": 256}'
    first, again = curl(server.url, body), curl(server.url, body)
    assert again.returncode == 22 and "409" in again.stderr, (again.stdout, again.stderr)
    assert again.stdout == first.stdout and again.stdout.startswith("FAIL: does not fit: "), again.stdout

def test_accept_estimate_answers_200_and_a_pass_estimated_line(server):
    body = ('{"model": "builtin:gpt-nano", "seq_len": 32, "capacity_bytes": 16777216, "mode": "estimate", '
            '"effective_batch": 8, "accept_estimate": %s}')
    refused, accepted = curl(server.url, body % "false"), curl(server.url, body % "true")
    assert refused.returncode == 22 and "409" in refused.stderr, refused.stdout
    assert accepted.returncode == 0, (accepted.stdout, accepted.stderr)
    assert accepted.stdout.startswith("PASS (estimated): 8 = "), accepted.stdout

@pytest.mark.slow
def test_a_cached_search_with_a_new_effective_batch_is_verified_then_passes(server):
    with server.client() as client:
        searched = client.post("/v1/preflight", json={**NANO, "effective_batch": 20},
                               headers={"accept": "application/json"}, timeout=300)
        assert searched.status_code == 200, searched.text
        answer = client.post("/v1/preflight", json={**NANO, "effective_batch": 18},
                             headers={"accept": "application/json"}, timeout=300)
    assert answer.status_code == 200, answer.text
    verdict, job = answer.json(), answer.json()["job"]
    source = job["search_cached_from"]
    assert source and verdict["passed"] and job["verification"]["passed"] and job["plan"]["effective_batch"] == 18
    assert job["trials"] == [] and job["report"]["search_cached_from"] == source, "the search was not run again"
    assert verdict["detail"].startswith("PASS: 18 = ") and f"(search cached from probe {source}; verified" in \
        verdict["detail"]


@pytest.mark.parametrize(("body", "field"), [
    ({"seq_len": 32, "effective_batch": 8}, "model"),
    ({**NANO, "effective_batch": 8, "timeout_s": 4000}, "timeout_s"),
    ({**NANO, "effective_batch": 0}, "effective_batch"),
])
def test_bad_input_answers_422_naming_the_field(server, body, field):
    with server.client() as client:
        response = client.post("/v1/preflight", json=body)
    assert response.status_code == 422 and field in response.json()["detail"], response.text


def test_no_verdict_within_timeout_s_answers_504_and_leaves_the_probe_running(server):
    with server.client() as client:
        response = client.post("/v1/preflight", json={**SLOW_JOB, "effective_batch": 8, "timeout_s": 1},
                               headers={"accept": "application/json"})
        job = response.json()["job"]
        client.delete(f"/v1/probes/{job['id']}")  # free the worker for the other tests
    assert response.status_code == 504 and not response.json()["passed"], response.text
    assert job["status"] in ("queued", "running")
    assert response.json()["detail"] == f"FAIL: timed out after 1 s: probe {job['id']} is still {job['status']}"
