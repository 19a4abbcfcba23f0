"""Sharing the service fairly and keeping its disk bounded (issue 20), against a real server: per-client
limits on jobs, streams and stored submits, the retention sweep, a full disk, and a job re-run after a
restart showing its final run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import FAST_JOB, HURRIED_SLEEPY_JOBS, SLOW_JOB, Server, start_server, wait_for

ALICE, BOB = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}


def _open_stream(server: Server, job_id: str, headers: dict[str, str]) -> tuple[socket.socket, int]:
    """An event stream left unread: the socket and the response's status code."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"GET /v1/probes/{job_id}/events HTTP/1.1", f"Host: {host}",
             *(f"{name}: {value}" for name, value in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    status_line = b""
    while b"\r\n" not in status_line:
        status_line += sock.recv(1)
    return sock, int(status_line.split()[1])


def test_one_client_cannot_take_every_job_slot_or_event_stream(tmp_path):
    server = start_server(tmp_path / "data", api_tokens="alice,bob", max_jobs_per_client="2",
                          max_streams_per_client="3", max_event_streams="10")
    sockets: list[socket.socket] = []
    try:
        with server.client() as client:
            mine = [client.post("/v1/probes", json={**SLOW_JOB, "seed": n}, headers=ALICE) for n in range(2)]
            assert [r.status_code for r in mine] == [202, 202]
            refused = client.post("/v1/probes", json={**SLOW_JOB, "seed": 2}, headers=ALICE)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert "FITPROBE_MAX_JOBS_PER_CLIENT=2" in refused.json()["detail"]
            theirs = client.post("/v1/probes", json={**SLOW_JOB, "seed": 3}, headers=BOB)
            assert theirs.status_code == 202  # the other client still gets its share

            job_id = mine[0].json()["id"]
            codes = []
            for _ in range(5):
                sock, code = _open_stream(server, job_id, ALICE)
                sockets.append(sock)
                codes.append(code)
            assert codes == [200, 200, 200, 429, 429]
            refused = client.get(f"/v1/probes/{job_id}/events", headers=ALICE)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert "FITPROBE_MAX_STREAMS_PER_CLIENT=3" in refused.json()["detail"]
            sock, code = _open_stream(server, job_id, BOB)
            sockets.append(sock)
            assert code == 200  # alice's unread streams did not take bob's

            # the store keeps a hash of the token, never the token, and the API shows neither
            assert "client" not in client.get(f"/v1/probes/{job_id}", headers=ALICE).json()
            database = b"".join(path.read_bytes() for path in server.data_dir.glob("fitprobe.db*"))
            assert b"alice" not in database and b"bob" not in database
            for job in (*mine, theirs):
                client.delete(f"/v1/probes/{job.json()['id']}", headers=ALICE)
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.slow  # one real probe (~10-30 s on the shared 2-core machine)
def test_cached_answers_count_against_the_client_and_the_sweep_bounds_the_store(tmp_path):
    server = start_server(tmp_path / "data", max_submits_per_client_per_minute="4")
    try:
        with server.client() as client:
            first = client.post("/v1/probes", json=FAST_JOB).json()
            assert wait_for(client, first["id"], ("succeeded", "failed"))["status"] == "succeeded"
            answers = [client.post("/v1/probes", json={**FAST_JOB, "effective_batch": 24 - n}) for n in range(1, 6)]
            assert [r.status_code for r in answers] == [202, 202, 202, 429, 429]
            assert all(r.json()["cached"] for r in answers[:3])
            refused = answers[3]
            assert refused.headers["retry-after"] == "60"
            assert "FITPROBE_MAX_SUBMITS_PER_CLIENT_PER_MINUTE=4" in refused.json()["detail"]
            assert "cache" in refused.json()["detail"]
            assert client.get("/v1/probes").json()["total"] == 4
    finally:
        server.stop()
    # 4 stored jobs, at most 2 kept: the sweep (at start-up, then every FITPROBE_SWEEP_INTERVAL_S) deletes
    # the oldest finished ones
    server = start_server(tmp_path / "data", max_stored_jobs="2", sweep_interval_s="0.5")
    try:
        with server.client() as client:
            deadline_s = time.monotonic() + 30
            while client.get("/v1/probes").json()["total"] > 2 and time.monotonic() < deadline_s:
                time.sleep(0.2)
            kept = client.get("/v1/probes").json()
            assert {job["id"] for job in kept["items"]} == {r.json()["id"] for r in answers[1:3]}
            assert client.get(f"/v1/probes/{first['id']}").status_code == 404
    finally:
        server.stop()


@contextlib.contextmanager
def _tiny_disk(path: Path, size: str = "16M"):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to flush on close
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.slow  # one real probe, then submits until the disk is full
def test_a_full_disk_answers_507_and_the_service_recovers_when_space_frees(tmp_path):
    """The data dir on a 16 MiB tmpfs that a filler file then fills: SQLite's writes fail for real with
    SQLITE_FULL ("database or disk is full"). Mounting needs root; without it the test is skipped, and
    tests/test_retention.py still checks the predicate on a real SQLITE_FULL (PRAGMA max_page_count)."""
    with _tiny_disk(tmp_path / "disk") as disk:
        server = start_server(disk / "data", max_submits_per_client_per_minute="1000")
        try:
            with server.client() as client:
                measured = client.post("/v1/probes", json=FAST_JOB).json()
                assert wait_for(client, measured["id"], ("succeeded", "failed"))["status"] == "succeeded"
                queued = client.post("/v1/probes", json=SLOW_JOB).json()
                filler = _fill(disk)
                codes = []
                for n in range(300):  # the WAL may still hold free pages: write until it cannot
                    answer = client.post("/v1/probes", json={**FAST_JOB, "effective_batch": 1 + n % 24})
                    codes.append(answer.status_code)
                    if answer.status_code != 202:
                        break
                assert answer.status_code == 507, codes
                assert int(answer.headers["retry-after"]) > 0
                assert "database or disk is full" in answer.json()["detail"]
                cancel = client.delete(f"/v1/probes/{queued['id']}")
                assert cancel.status_code in (507, 200)  # 200 only if the WAL had room for one more frame
                assert client.get(f"/v1/probes/{measured['id']}").status_code == 200  # reads still answer
                assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200

                filler.unlink()
                assert client.post("/v1/probes", json={**FAST_JOB, "effective_batch": 12}).status_code == 202
                if cancel.status_code == 507:
                    assert client.delete(f"/v1/probes/{queued['id']}").status_code == 200
        finally:
            server.stop()


@pytest.mark.slow  # a probe interrupted by kill -9 and run again, the rerun hurried (HURRIED_SLEEPY_JOBS)
def test_a_job_rerun_after_a_restart_shows_its_final_attempts_trials(tmp_path):
    server = start_server(tmp_path / "data")
    port = int(server.url.rsplit(":", 1)[1])
    with server.client() as client:
        job = client.post("/v1/probes", json={**SLOW_JOB, "effective_batch": 24}).json()
        wait_for(client, job["id"], ("running",), predicate=lambda j: j["trials"])
    server.kill()
    restarted = start_server(tmp_path / "data", port=port, env=HURRIED_SLEEPY_JOBS)
    try:
        with restarted.client() as client:
            done = wait_for(client, job["id"], ("succeeded", "failed"), timeout_s=300)
            assert done["status"] == "succeeded", done["error"]
            assert done["attempts"] == 2
            assert done["trials"] and {t["attempt"] for t in done["trials"]} == {2}
            assert len(done["trials"]) == done["report"]["search"]["trial_count"]
            [earlier] = done["earlier_attempts"]
            assert earlier["attempt"] == 1 and earlier["trials"]
            assert {t["attempt"] for t in earlier["trials"]} == {1}

            replay = client.get(f"/v1/probes/{job['id']}/events").text
            data = [json.loads(line[len("data: "):]) for line in replay.splitlines() if line.startswith("data: ")]
            trial_attempts = [event["attempt"] for event in data if event.get("type") == "trial"]
            assert trial_attempts == sorted(trial_attempts) and set(trial_attempts) == {1, 2}
            assert all("attempt" in event for event in data[:-1])  # all but `end`
    finally:
        restarted.stop()
