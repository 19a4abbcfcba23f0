"""HTTP-level hostility against a real uvicorn server, over raw sockets where a client library would tidy the
request: foreign Host headers, oversized and ambiguous heads, slow clients, loose JSON types, and a clean
stop in the middle of a job. Every refusal is a status with a JSON detail, and the server answers the next
client afterwards."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator

import pytest

from tests.api.conftest import SLOW_JOB, Server, in_process, start_server, wait_for

TIMEOUT_S = 2  # the header and body deadlines of this module's server
SECURITY_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("hygiene") / "data", header_timeout_s=str(TIMEOUT_S),
                           body_timeout_s=str(TIMEOUT_S))
    yield running
    running.stop()


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _raw(server: Server, request: bytes, read_timeout_s: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send `request` byte for byte, read until the server closes (or a response with a length is in)."""
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.settimeout(read_timeout_s)
        sock.sendall(request)
        return _read_response(sock)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62  # no length: read until the server closes


def _still_answers(server: Server) -> None:
    with server.client() as client:
        assert client.get("/healthz").status_code == 200


def _get(path: str, host: bytes = b"localhost", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"Connection: close\r\n\r\n"


# ---- 1. Host header (DNS rebinding) ----------------------------------------------------------------
@pytest.mark.parametrize("host", [b"evil.example", b"evil.example:8000", b"127.0.0.1.evil.example", b"localhost.evil"])
def test_a_foreign_host_is_400_naming_the_setting(server, host):
    status, headers, body = _raw(server, _get("/v1/probes", host))
    assert status == 400 and headers["content-type"] == "application/json"
    assert "FITPROBE_ALLOWED_HOSTS" in json.loads(body)["detail"]
    _still_answers(server)


@pytest.mark.parametrize("host", [b"localhost", b"127.0.0.1", b"[::1]", b"localhost:%d", b"127.0.0.1:%d",
                                  b"[::1]:8000"])
def test_loopback_names_with_any_port_are_allowed(server, host):
    host = host.replace(b"%d", str(_port(server)).encode())
    assert _raw(server, _get("/healthz", host))[0] == 200


def test_allowed_hosts_are_configurable_and_star_allows_any(tmp_path):
    # the Host check is the app's own middleware: two configured apps in process, not two servers to start
    with in_process(tmp_path / "named", allowed_hosts="fitprobe.internal, *.example.org") as named:
        assert named.get("/healthz", headers={"host": "fitprobe.internal:8000"}).status_code == 200
        assert named.get("/healthz", headers={"host": "gpu.example.org"}).status_code == 200
        refused = named.get("/healthz", headers={"host": "localhost"})  # the setting replaces the defaults
        assert refused.status_code == 400 and "fitprobe.internal" in refused.json()["detail"]
    with in_process(tmp_path / "any", allowed_hosts="*") as anyone:
        assert anyone.get("/healthz", headers={"host": "whatever.example"}).status_code == 200


# ---- 2. security headers ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/index.html", "/dashboard.js", "/dashboard.css", "/healthz", "/v1/probes",
                                  "/v1/probes/nope", "/no-such-file.js", "/docs-assets/swagger-ui.css"])
def test_every_response_carries_the_security_headers(server, path):
    _, headers, _ = _raw(server, _get(path))
    assert {name: headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS, path
    policy = headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy


def test_refusals_before_the_app_carry_the_security_headers_too(server):
    for request in (_get("/", b"evil.example"), _get("/" + "a" * 20_000)):
        _, headers, _ = _raw(server, request)
        assert {name: headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS


def test_the_swagger_page_allows_its_one_inline_script_by_hash_only(server):
    _, headers, body = _raw(server, _get("/docs"))
    policy = headers["content-security-policy"]
    assert "'sha256-" in policy and "script-src 'self' 'sha256-" in policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";")[0]
    assert "frame-ancestors 'none'" in policy and b"<script>" in body


# ---- 3. ambiguous and oversized heads --------------------------------------------------------------
def test_content_length_with_transfer_encoding_is_400(server):
    request = (b"POST /v1/plans HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    status, headers, body = _raw(server, request)
    assert status == 400 and headers["connection"] == "close"
    assert "Content-Length and Transfer-Encoding" in json.loads(body)["detail"]
    _still_answers(server)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (_get("/", extra=b"".join(b"X-H%d: 1\r\n" % i for i in range(10_000))), 431),  # ~100 KB, one read
    (_get("/", extra=b"X-Big: " + b"a" * (1 << 20) + b"\r\n"), 431),
    (_get("/?q=" + "a" * (1 << 20)), 414),
    (_get("/?q=" + "a" * 20_000), 414),
], ids=["10000-headers", "1MB-header", "1MB-url", "20KB-url"])
def test_an_oversized_head_is_answered_not_reset(server, request_bytes, status):
    answered, headers, body = _raw(server, request_bytes)
    assert answered == status and headers["content-type"] == "application/json"
    assert "16384 bytes" in json.loads(body)["detail"]
    _still_answers(server)


def test_garbage_is_a_json_400(server):
    status, _, body = _raw(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n")
    assert status == 400 and json.loads(body)["detail"].startswith("malformed HTTP request")
    _still_answers(server)


# ---- 4. slow clients ---------------------------------------------------------------------------------
def test_headers_sent_one_byte_at_a_time_are_cut_off_with_408(server):
    request = _get("/healthz")
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.settimeout(0.5)
        started_s, answer = time.monotonic(), b""
        for byte in request[:-1]:
            try:
                sock.send(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer:
                break
        elapsed_s = time.monotonic() - started_s
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"FITPROBE_HEADER_TIMEOUT_S" in answer
    assert TIMEOUT_S - 0.5 <= elapsed_s < TIMEOUT_S + 3
    _still_answers(server)


def test_a_body_that_never_finishes_is_cut_off_with_408_while_others_are_served(server):
    request = (b"POST /v1/plans HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: 100\r\n\r\n{\"effective_batch\": ")
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.settimeout(TIMEOUT_S + 5)
        started_s = time.monotonic()
        sock.sendall(request)
        _still_answers(server)  # another client, meanwhile
        status, headers, body = _read_response(sock)
        elapsed_s = time.monotonic() - started_s
        assert sock.recv(1) == b""  # and the connection is closed
    assert status == 408 and headers["connection"] == "close"
    assert "FITPROBE_BODY_TIMEOUT_S" in json.loads(body)["detail"]
    assert TIMEOUT_S - 0.5 <= elapsed_s < TIMEOUT_S + 3


def test_a_connection_that_sends_nothing_is_closed(server):
    with socket.create_connection(("127.0.0.1", _port(server))) as sock:
        sock.settimeout(TIMEOUT_S + 5)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and sock.recv(1) == b""


def test_many_slow_clients_do_not_block_a_fast_one(server):
    sockets = [socket.create_connection(("127.0.0.1", _port(server))) for _ in range(50)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        _still_answers(server)
    finally:
        for sock in sockets:
            sock.close()


# ---- 5. strict input types -------------------------------------------------------------------------
ESTIMATE = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "mode": "estimate", "capacity_bytes": "1GiB",
            "effective_batch": 8, "reuse": False}


@pytest.mark.parametrize(("field", "value"), [
    ("seq_len", True), ("seq_len", "32"), ("seq_len", 32.0), ("effective_batch", True), ("num_devices", True),
    ("max_micro_batch", False), ("micro_steps_per_trial", True), ("capacity_bytes", True),
    ("capacity_bytes", "１２GiB"), ("capacity_bytes", "١٢GiB"), ("capacity_bytes", "12 GiB\u0660"),
])
def test_a_loosely_typed_integer_is_a_422_naming_the_field(server, field, value):
    with server.client() as client:
        response = client.post("/v1/probes", json={**ESTIMATE, field: value})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}: ")


def test_plan_integers_are_strict_too(server):
    with server.client() as client:
        response = client.post("/v1/plans", json={"effective_batch": True, "max_micro_batch": 8})
        assert response.status_code == 422 and response.json()["detail"].startswith("effective_batch: ")
        assert client.post("/v1/plans", json={"effective_batch": 64, "max_micro_batch": 8}).status_code == 200


def test_one_exbibyte_is_accepted(server):
    with server.client() as client:
        response = client.post("/v1/probes", json={**ESTIMATE, "capacity_bytes": "1EiB"})
        assert response.status_code == 202, response.text
        assert response.json()["spec"]["capacity_bytes"] == 2**60
        client.delete(f"/v1/probes/{response.json()['id']}")
        response = client.post("/v1/probes", json={**ESTIMATE, "capacity_bytes": "2EiB"})
        assert response.status_code == 422 and "at most 1EiB" in response.json()["detail"]


# ---- 6. a clean stop does not spend an attempt ------------------------------------------------------
def _stored(server: Server, job_id: str) -> tuple[str, int]:
    database = sqlite3.connect(server.data_dir / "fitprobe.db")
    try:
        return database.execute("SELECT status, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        database.close()


@pytest.mark.slow
def test_sigterm_requeues_a_running_job_without_spending_an_attempt_and_kill_9_spends_one(tmp_path):
    data_dir = tmp_path / "data"
    first = start_server(data_dir)
    try:
        with first.client() as client:
            job_id = client.post("/v1/probes", json=SLOW_JOB).json()["id"]
            wait_for(client, job_id, ("running",), timeout_s=60)
    finally:
        first.stop()  # SIGTERM
    assert _stored(first, job_id) == ("queued", 0)

    second = start_server(data_dir)
    with second.client() as client:
        assert wait_for(client, job_id, ("running",), timeout_s=60)["attempts"] == 1
    second.kill()  # a crash: the run counts
    assert _stored(second, job_id) == ("running", 1)

    third = start_server(data_dir)
    try:
        with third.client() as client:
            job = wait_for(client, job_id, ("running",), timeout_s=60, predicate=lambda j: j["attempts"] == 2)
            assert job["status"] == "running"
    finally:
        third.stop()
    assert _stored(third, job_id) == ("queued", 1)


def test_the_service_still_answers_after_all_of_the_above(server):
    _still_answers(server)
    assert server.process.poll() is None
