"""No request can take the service down by the processes it starts: a job that would spawn one
process per device is refused at the door beyond the cap, and no job or rank process outlives the
server, even one killed with `kill -9`."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.api.conftest import Server, gone, start_server, wait_for

BOMB = {"model": "builtin:gpt-nano", "seq_len": 64, "precision": "fp32", "capacity_bytes": "100MiB", "sharding": "fsdp",
        "num_devices": 1024}
# a measured sharded job: every trial spawns two gloo ranks, for a few seconds in all on the CPU
TWO_RANKS = {**BOMB, "num_devices": 2, "reuse": False}


def _descendants(server: Server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children(recursive=True)


@pytest.mark.parametrize("body", [
    BOMB,
    {**BOMB, "sharding": "none", "effective_batch": 1024},  # a verification on 1024 devices
    # the same verification with its target in tokens: packed rows of seq_len 8, one per device
    {"model": "builtin:gpt-nano", "seq_len": 8, "collation": "packed", "effective_batch_tokens": 8 * 1024,
     "num_devices": 1024},
])
def test_a_request_for_a_process_per_device_beyond_the_cap_is_a_422_and_spawns_nothing(server, body):
    before = {p.pid for p in _descendants(server)}
    with server.client() as client:
        response = client.post("/v1/probes", json=body)
        time.sleep(0.5)  # a job the worker claimed would have started its process by now
        assert client.get("/v1/probes", params={"status": "queued"}).json()["total"] == 0
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "num_devices must be ≤ 4 here (got 1024)" in detail, detail
    assert "FITPROBE_MAX_VERIFY_PROCESSES" in detail and "lower num_devices" in detail and "estimate" in detail
    assert {p.pid for p in _descendants(server)} <= before


def test_a_token_target_on_more_devices_than_the_cap_is_refused_as_a_row_target_is(server):
    # 16 gloo ranks were started for this before: the cap read only effective_batch
    body = {"model": "builtin:gpt-nano", "seq_len": 8, "collation": "packed", "num_devices": 16}
    with server.client() as client:
        by_tokens = client.post("/v1/probes", json={**body, "effective_batch_tokens": 128})
        by_rows = client.post("/v1/probes", json={**body, "effective_batch": 16})
    assert (by_tokens.status_code, by_rows.status_code) == (422, 422)
    assert by_tokens.json()["detail"] == by_rows.json()["detail"]


def test_the_same_request_as_an_estimate_is_accepted(server):
    with server.client() as client:
        response = client.post("/v1/probes", json={**BOMB, "mode": "estimate", "reuse": False})
        assert response.status_code == 202, response.text
        client.delete(f"/v1/probes/{response.json()['id']}")


@pytest.mark.slow
def test_kill_9_of_the_server_leaves_no_job_or_rank_process_behind(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        with server.client() as client:
            job = client.post("/v1/probes", json=TWO_RANKS).json()
            running = wait_for(client, job["id"], ("running",), timeout_s=30, predicate=lambda j: j["worker_pid"])
        job_process = psutil.Process(running["worker_pid"])

        def ranks() -> list[psutil.Process]:
            """The job's ranks: forked by the job's own fork server (probe/forked.py), so its grandchildren."""
            return [rank for child in job_process.children() for rank in child.children()]

        deadline = time.monotonic() + 20
        while len(ranks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        descendants = _descendants(server)
        assert job_process in descendants and len(ranks()) >= 2, "no rank was running"
        assert set(ranks()) <= set(descendants)
        server.kill()
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [f"{p.pid} {p.cmdline()}" for p in descendants if not gone(p)]
        assert not alive, f"processes outlived the server: {alive}"
    finally:
        server.stop()
