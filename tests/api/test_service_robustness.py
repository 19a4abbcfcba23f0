"""The service under pressure, against a real uvicorn server: floods of submits and streams, a locked
database, multi-device jobs, requests that would only fail later, and a cache that must not answer
more than it measured."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import sqlalchemy as sa

from fitprobe.app.config import Settings
from fitprobe.app.executors import base, local
from tests.api.conftest import FAST_JOB, SLOW_JOB, Server, free_port, start_server, wait_for


def _start_slow_job(server: Server) -> dict:
    """A job that keeps the only (CPU) worker busy, so what is submitted next stays queued."""
    with server.client() as client:
        slow = client.post("/v1/probes", json=SLOW_JOB).json()
        return wait_for(client, slow["id"], ("running",), predicate=lambda j: j["worker_pid"])


def test_concurrent_submits_never_queue_beyond_the_limit(tmp_path):
    server = start_server(tmp_path / "data", max_queued_jobs="5")
    try:
        _start_slow_job(server)

        def submit(seed: int) -> httpx.Response:
            with server.client() as client:  # a connection per thread: the submits really race
                return client.post("/v1/probes", json={**FAST_JOB, "seed": seed, "reuse": False})

        with ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(submit, range(50)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] * 5 + [429] * 45
        assert all(int(r.headers["retry-after"]) > 0 for r in responses if r.status_code == 429)
        with server.client() as client:
            assert client.get("/v1/probes", params={"status": "queued"}).json()["total"] == 5
    finally:
        server.stop()


def _readyz(server: Server) -> httpx.Response:
    return httpx.get(f"{server.url}/readyz", timeout=10)


def _until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = condition()
        if answer:
            return answer
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout_s}s")


def test_a_worker_outlives_a_locked_database_and_readyz_says_so_meanwhile(tmp_path):
    server = start_server(tmp_path / "data")
    try:
        slow = _start_slow_job(server)
        with server.client() as client:
            queued = client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()
        lock = sqlite3.connect(tmp_path / "data" / "fitprobe.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # held past the store's 5 s busy timeout
        try:
            os.kill(slow["worker_pid"], signal.SIGKILL)  # the worker must now write the job's failure
            refused = _until(lambda: (r := _readyz(server)).status_code == 503 and r, 30, "readyz never said 503")
            assert "worker cpu: database error: database is locked (retrying)" in refused.json()["detail"]
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        _until(lambda: _readyz(server).status_code == 200, 30, "readyz never recovered")
        with server.client() as client:
            assert "SIGKILL" in wait_for(client, slow["id"], ("failed",))["error"]
            assert wait_for(client, queued["id"], ("succeeded", "failed"))["status"] == "succeeded"
            after = client.post("/v1/probes", json={**FAST_JOB, "seed": 1, "reuse": False}).json()
            assert wait_for(client, after["id"], ("succeeded", "failed"))["status"] == "succeeded"
    finally:
        server.stop()


def test_the_worker_loop_retries_database_errors_and_reports_them_until_they_pass(monkeypatch):
    monkeypatch.setattr(base, "DB_RETRY_FIRST_S", 0.01)
    stopping, seen = threading.Event(), []

    class LockedTwice:
        calls = 0

        def claim_next(self, device: str) -> None:
            self.calls += 1
            if self.calls <= 2:
                raise sa.exc.OperationalError("UPDATE jobs", {}, sqlite3.OperationalError("database is locked"))
            seen.append(worker.db_error)
            stopping.set()

    worker = local.DeviceWorker("cpu", LockedTwice(), Settings(), stopping)
    worker.run()  # returns: the errors did not end the loop, the stop did
    assert seen == ["database is locked"] and worker.db_error is None


TWO_DEVICES = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "capacity_bytes": 16777216, "effective_batch": 8,
               "num_devices": 2, "reuse": False}


def test_a_two_device_job_verifies_with_a_process_per_device(server):
    with server.client() as client:
        job = client.post("/v1/probes", json=TWO_DEVICES).json()
        done = wait_for(client, job["id"], ("succeeded", "failed"), timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["verification"]["passed"] and done["verification"]["num_devices"] == 2
    assert done["plan"]["num_devices"] == 2


def test_more_devices_than_the_cpu_can_verify_is_a_422(server):
    with server.client() as client:
        response = client.post("/v1/probes", json={**TWO_DEVICES, "num_devices": 5})
    assert response.status_code == 422
    assert "num_devices must be ≤ 4" in response.json()["detail"]
    assert "FITPROBE_MAX_VERIFY_PROCESSES" in response.json()["detail"]


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, waiting for whoever reaps it
    except psutil.NoSuchProcess:
        return True


def test_cancel_kills_the_verification_processes_of_a_multi_device_job(server):
    with server.client() as client:
        job = client.post("/v1/probes", json={**TWO_DEVICES, "effective_batch": 64}).json()
        running = wait_for(client, job["id"], ("running", "succeeded", "failed"), timeout_s=300,
                           predicate=lambda j: j["phase"] in ("verifying", "done", "failed"))
        assert running["phase"] == "verifying", "the verification ended before the test could cancel it"
        job_process = psutil.Process(running["worker_pid"])
        ranks = _until(lambda: job_process.children(recursive=True), 30, "the verification spawned no process")
        assert client.delete(f"/v1/probes/{job['id']}").status_code == 200
    _until(lambda: all(_gone(p) for p in [job_process, *ranks]), 10, "a process outlived the cancel")


def _open_stream(server: Server, job_id: str) -> tuple[socket.socket, int]:
    """An event stream held open on a raw socket, and its status code."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /v1/probes/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    status_line = b""
    while b"\r\n" not in status_line:
        status_line += sock.recv(1)
    return sock, int(status_line.split()[1])


def test_event_streams_are_capped_and_hold_up_neither_the_api_nor_a_stop(tmp_path):
    server = start_server(tmp_path / "data", max_event_streams="120", max_streams_per_client="200")
    sockets = []
    try:
        slow = _start_slow_job(server)
        codes = []
        for _ in range(150):
            sock, code = _open_stream(server, slow["id"])
            sockets.append(sock)
            codes.append(code)
        assert codes.count(200) == 120 and codes.count(429) == 30
        # 120 open streams hold up neither the API (answered inside httpx's timeout) nor a stop (inside wait's)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        with server.client() as client:
            assert client.get(f"/v1/probes/{slow['id']}").status_code == 200
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.parametrize("change,field,words", [
    ({"model": "preset:lama-3.2-1b"}, "model", "did you mean 'llama-3.2-1b'?"),
    ({"model": "builtin:gpt-nan"}, "model", "did you mean 'gpt-nano'?"),
    ({"model": {"model_type": "lama", "hidden_size": 64}}, "model", "did you mean 'llama'?"),
    ({"model": "factory:os:system"}, "model", "not allow-listed"),
    ({"model": "hf:/etc/hostname"}, "model", "send the config object inline"),
    ({"capacity_bytes": 1}, "capacity_bytes", "smaller than the model's weights"),
    ({"device": "cuda:0"}, "device", "this service has no cuda:0"),
    ({"capacity_bytes": 5 << 30}, "capacity_bytes", '"mode": "estimate"'),
])
def test_requests_that_would_fail_in_their_job_are_refused_at_the_door(server, change, field, words):
    with server.client() as client:
        response = client.post("/v1/probes", json={**FAST_JOB, **change})
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert detail.startswith(field) and words in detail
        assert len(detail) < 500
        # a cached CPU result is never handed out under another device's name
        if change.get("device"):
            assert client.post("/v1/probes", json={**FAST_JOB, "device": "cpu"}).status_code == 202


def test_a_big_capacity_is_fine_for_an_estimate(server):
    with server.client() as client:
        response = client.post("/v1/probes", json={**FAST_JOB, "capacity_bytes": 5 << 30, "mode": "estimate"})
        assert response.status_code == 202, response.text


def test_the_cache_never_answers_beyond_the_limit_its_search_stopped_at(server):
    small = {**FAST_JOB, "seed": 7, "effective_batch": 8}
    with server.client() as client:
        first = wait_for(client, client.post("/v1/probes", json=small).json()["id"], ("succeeded", "failed"))
        assert first["report"]["search"]["limit_reached"] and first["report"]["search"]["max_micro_batch"] == 8
        bigger = client.post("/v1/probes", json={**small, "effective_batch": 200}).json()
        assert bigger["cached"] is False
        bigger = wait_for(client, bigger["id"], ("succeeded", "failed"), timeout_s=300)
        assert bigger["report"]["search"]["max_micro_batch"] > 8
        # the bigger search answers a smaller batch; its plan was not the one verified
        again = client.post("/v1/probes", json={**small, "effective_batch": 16}).json()
        assert again["cached"] is True and again["report"]["search"] == bigger["report"]["search"]
        assert again["plan"]["effective_batch"] == 16
        assert again["verification"] is None
        assert again["verification_note"] == "not run for this plan; submit with reuse=false to verify"


_UNGUARDED_SCRIPT = """\
import sys

import uvicorn

from fitprobe.app.config import Settings
from fitprobe.app.main import create_app

uvicorn.run(create_app(Settings(data_dir=sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]))
"""


def test_a_script_that_starts_the_service_without_a_main_guard_is_told_how_to_fix_it(tmp_path):
    """Job processes fork from a fork server that imports the main module again: a user's script without
    `if __name__ == "__main__":` starts a second service there instead of forking. /readyz says so and how
    to fix it, rather than leaving its jobs queued with no word why."""
    script = tmp_path / "serve_mine.py"
    script.write_text(_UNGUARDED_SCRIPT)
    port = free_port()
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        answer = None
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 503:
                break
            assert process.poll() is None, "the service itself must keep running and say what is wrong"
            time.sleep(0.5)
        assert answer is not None and answer.status_code == 503, answer and answer.text
        detail = answer.json()["detail"]
        assert "job processes cannot start" in detail
        assert 'if __name__ == "__main__":' in detail and "fitprobe serve" in detail
    finally:
        process.kill()
        process.wait(timeout=10)
