"""Hostile and malformed input against a real uvicorn server: a 4xx that says what to change, never a
500, and nothing stored that could break the service for the next caller."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

import pytest

from tests.api.conftest import Server, start_server, wait_for
from tests.api.chromium import rendered_dom

MAX_BODY_BYTES = 256 * 1024  # app/config.py's default
PLAN = {"effective_batch": 64, "max_micro_batch": 8}
CHEAP_JOB = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "mode": "estimate", "capacity_bytes": "1GiB",
             "reuse": False}


def _total(client) -> int:
    response = client.get("/v1/probes")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def _chunks(total_bytes: int, chunk_bytes: int = 64 * 1024) -> Iterator[bytes]:
    """A body httpx sends with Transfer-Encoding: chunked and no Content-Length."""
    yield b'{"model": "builtin:gpt-nano", "seq_len": 32, "pad": "'
    for _ in range(total_bytes // chunk_bytes):
        yield b"x" * chunk_bytes
    yield b'"}'


# ---- 1. body limit -----------------------------------------------------------------------------
def test_a_chunked_upload_past_the_body_limit_is_413_and_nothing_is_stored(server):
    with server.client() as client:
        before = _total(client)
        response = client.post("/v1/probes", content=_chunks(2 << 20), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert str(MAX_BODY_BYTES) in response.json()["detail"]
        assert _total(client) == before
        # a chunked body under the limit is still read as usual
        small = client.post("/v1/plans", content=iter([b'{"effective_batch": 64, ', b'"max_micro_batch": 8}']),
                            headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text
        assert small.json()["plan"]["effective_batch"] == 64


def test_a_declared_content_length_past_the_limit_is_413(server):
    with server.client() as client:
        response = client.post("/v1/plans", content=b" " * (MAX_BODY_BYTES + 1),
                               headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert str(MAX_BODY_BYTES) in response.json()["detail"]


def test_a_body_over_the_limit_is_refused_with_413(server):
    # from test_probes_watch.py, whose other tests run in process: a body limit is the wire's
    with server.client() as client:
        response = client.post("/v1/probes", content=b"{" + b" " * (300 * 1024) + b"}",
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"].startswith("request body must be ≤")


# ---- 2. lone surrogates, and rows nobody can read -------------------------------------------------
@pytest.mark.parametrize(("body", "field"), [
    (b'{"model": "builtin:\\ud800", "seq_len": 32}', "model"),
    (b'{"model": {"model_type": "llama", "architectures": ["\\udfff"]}}', "model"),
    (b'{"model": "builtin:gpt-nano", "lora": {"targets": ["q_proj\\ud83d"]}}', "lora"),
])
def test_a_lone_surrogate_is_a_422_naming_the_field_and_stores_nothing(server, body, field):
    with server.client() as client:
        before = _total(client)
        response = client.post("/v1/probes", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(f"{field}: ") and "surrogate" in response.json()["detail"]
        assert _total(client) == before


def test_rows_that_cannot_be_read_are_marked_and_the_list_still_answers(server):
    database = sqlite3.connect(server.data_dir / "fitprobe.db")
    rows = [("badjsonspec00001", "failed", "{not json", None),
            ("surrogatespec001", "succeeded", '{"model": "builtin:\\ud800"}', None),
            ("badresult0000001", "succeeded", '{"model": "builtin:gpt-nano"}', '{"search": "\\udc00"}'),
            ("queuedunreadable", "queued", '{"model": [[[', None)]
    with database:
        for job_id, status, spec, result in rows:
            database.execute("INSERT INTO jobs (id, status, phase, spec, fingerprint, attempts, cached, result, "
                             "created_at) VALUES (?, ?, 'done', ?, 'x', 0, 0, ?, '2099-01-01 00:00:00.000000')",
                             (job_id, status, spec, result))
        database.execute("INSERT INTO events (job_id, data, created_at) VALUES "
                         "('badresult0000001', '{\"type\": \"trial\", \"b\": \"\\ud800\"}', '2099-01-01 00:00:00')")
    database.close()
    with server.client() as client:
        listed = client.get("/v1/probes", params={"limit": 200})
        assert listed.status_code == 200, listed.text
        by_id = {job["id"]: job for job in listed.json()["items"]}
        for job_id, *_ in rows:
            assert "unreadable" in by_id[job_id]["error"]
            one = client.get(f"/v1/probes/{job_id}")
            assert one.status_code == 200 and "unreadable" in one.json()["error"]
        assert by_id["surrogatespec001"]["spec"] is None and by_id["badresult0000001"]["report"] is None
        # the worker does not run (or choke on) a queued row it cannot read: it fails it and goes on
        failed = wait_for(client, "queuedunreadable", ("failed",), timeout_s=120)
        assert "unreadable" in failed["error"]
        assert client.post("/v1/plans", json=PLAN).status_code == 200
    # the dashboard renders the rows it can read and marks the others
    dom = rendered_dom(f"{server.url}/")
    assert dom.count("(unreadable)") >= 3 and "queuedunreadable" in dom


# ---- 3. authorization header bytes ---------------------------------------------------------------
def test_a_non_ascii_authorization_header_is_401_and_tokens_compare_as_bytes(tmp_path):
    server = start_server(tmp_path / "data", api_tokens="s3cret,t0ken-\u00fc")
    try:
        with server.client() as client:
            for raw in (b"Bearer \xc3\xbc\xff\xfe", b"Bearer s3cret\xe9", b"\xff\xfe s3cret"):
                response = client.get("/v1/probes", headers={"Authorization": raw})
                assert response.status_code == 401, (raw, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "Authorization: Bearer <token>" in response.json()["detail"]
            assert client.get("/v1/probes", headers={"Authorization": b"Bearer s3cret"}).status_code == 200
            # a configured non-ASCII token matches its UTF-8 bytes
            utf8 = "Bearer t0ken-\u00fc".encode()
            assert client.get("/v1/probes", headers={"Authorization": utf8}).status_code == 200
    finally:
        server.stop()


# ---- 4. capacities that overflow -----------------------------------------------------------------
@pytest.mark.parametrize("capacity", ["1e400GiB", "9" * 400 + "GiB", "9" * 30 + "TiB", "nanGiB", "infGiB",
                                      10**30, 2**60 + 1])
def test_an_overflowing_capacity_is_a_422_naming_capacity_bytes(server, capacity):
    with server.client() as client:
        before = _total(client)
        response = client.post("/v1/probes", json={**CHEAP_JOB, "capacity_bytes": capacity})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("capacity_bytes: ")
        assert _total(client) == before


@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"NaN"])
def test_non_finite_json_numbers_are_a_422(server, literal):
    with server.client() as client:
        response = client.post("/v1/probes", content=b'{"capacity_bytes": ' + literal + b"}",
                               headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text


# ---- 5. deeply nested or huge inline configs ------------------------------------------------------
def test_a_deeply_nested_inline_config_is_refused_without_a_server_error(server):
    with server.client() as client:
        before = _total(client)
        nested_900 = {"model": {"model_type": "llama", "x": _nested(900)}}
        response = client.post("/v1/probes", json=nested_900)
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == "model: nested deeper than 32 levels; send a flat config"
        # deeper than the JSON parser's own recursion limit: a 400, still not a 500
        deeper = b'{"model": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
        response = client.post("/v1/probes", content=deeper, headers={"content-type": "application/json"})
        assert response.status_code in (400, 422), response.text
        wide = {"model": {"model_type": "llama", "x": list(range(20_000))}}
        response = client.post("/v1/probes", json=wide)
        assert response.status_code == 422 and "more than 10000 values" in response.json()["detail"]
        assert _total(client) == before
        # an ordinary request still passes the door
        assert client.post("/v1/probes", json=CHEAP_JOB).status_code == 202


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# ---- 6. Last-Event-ID -----------------------------------------------------------------------------
@pytest.mark.parametrize("last_event_id", ["9" * 5000, "9" * 30, "-1", "1e3", "0x10"])
def test_an_out_of_range_last_event_id_is_a_422(server, last_event_id):
    with server.client() as client:
        job_id = client.post("/v1/probes", json=CHEAP_JOB).json()["id"]
        response = client.get(f"/v1/probes/{job_id}/events", headers={"Last-Event-ID": last_event_id})
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("Last-Event-ID must be an event id between 0 and")
        client.delete(f"/v1/probes/{job_id}")


# ---- 7. /docs offline -----------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_only_assets_the_service_serves(server, page):
    with server.client() as client:
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert not re.search(r"https?://", html.text), "the docs page names an outside host"
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert any(a.endswith(".js") for a in assets)
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200, asset
            kind = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}[asset[asset.rfind("."):]]
            assert response.headers["content-type"].startswith(kind), (asset, response.headers["content-type"])
            assert len(response.content) > 1000


def test_swagger_ui_renders_every_route_in_a_browser_without_internet(server):
    # headless Chromium with background networking off: a CDN asset would leave the page blank
    dom = rendered_dom(f"{server.url}/docs")
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {"/v1/probes", "/v1/probes/{job_id}/events", "/v1/plans", "/metrics"} <= paths, dom[-2000:]


# ---- 8. the OpenAPI schema documents the errors ----------------------------------------------------
def test_the_openapi_schema_documents_every_error_body_and_content_type(server):
    with server.client() as client:
        schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components  # FastAPI's default 422 is not the body we send
    expected = {
        ("post", "/v1/probes"): {400, 401, 413, 422, 429},
        ("get", "/v1/probes"): {401, 422},
        ("get", "/v1/probes/{job_id}"): {401, 404, 422},
        ("delete", "/v1/probes/{job_id}"): {401, 404, 409, 422},
        ("get", "/v1/probes/{job_id}/events"): {401, 404, 422},
        ("post", "/v1/whatif"): {400, 401, 413, 422, 429},
        ("get", "/v1/whatif/{job_id}"): {401, 404, 422},
        ("delete", "/v1/whatif/{job_id}"): {401, 404, 409, 422},
        ("get", "/v1/whatif/{job_id}/events"): {401, 404, 422},
        ("post", "/v1/plans"): {400, 401, 413, 422},
        ("get", "/v1/devices"): {401},
        ("get", "/readyz"): {503},
    }
    for (method, path), codes in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert codes <= {int(code) for code in responses}, (method, path, sorted(responses))
        for code, response in responses.items():
            if int(code) < 400:
                continue
            assert list(response["content"]) == ["application/json"], (method, path, code)
            body = components[response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
            assert body["properties"]["detail"]["type"] == "string" and "detail" in body["required"]
    retry = schema["paths"]["/v1/probes"]["post"]["responses"]["429"]["headers"]["Retry-After"]
    assert retry["schema"]["type"] == "integer"
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == \
        ["text/plain; version=0.0.4; charset=utf-8"]
    assert list(schema["paths"]["/v1/probes/{job_id}/events"]["get"]["responses"]["200"]["content"]) == \
        ["text/event-stream"]


def test_every_request_field_is_described_with_its_unit(server):
    with server.client() as client:
        components = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("ProbeRequest", "LoraSpec", "PlanRequest", "WhatIfSpec"):
        undescribed = [field for field, prop in components[name]["properties"].items() if not prop.get("description")]
        assert not undescribed, (name, undescribed)
    probe = components["ProbeRequest"]["properties"]
    assert "bytes" in probe["capacity_bytes"]["description"] and "tokens" in probe["seq_len"]["description"]
    assert "fraction" in probe["headroom"]["description"]


def test_the_metrics_content_type_is_the_one_documented(server):
    with server.client() as client:
        response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_the_service_still_answers_after_all_of_the_above(server: Server):
    with server.client() as client:
        assert client.get("/v1/probes").status_code == 200
        assert client.get("/readyz").status_code == 200
