"""Schemathesis over the OpenAPI schema of a live server: no request makes it answer 500."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.api.conftest import start_server


def test_no_generated_request_gets_a_server_error(tmp_path):
    server = start_server(tmp_path / "data", max_queued_jobs="1000")
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        failures, calls = [], []
        for operation in schema.get_all_operations():
            op = operation.ok()
            if op.path.endswith("/events") or op.path == "/v1/preflight":
                continue  # an open stream, or a wait for a probe: covered by the end-to-end tests

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy())
            def check(case):
                response = case.call(base_url=server.url, timeout=30)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.formatted_path, case.body, response.text[:300]))

            check()
        assert len(calls) >= 100, f"only {len(calls)} requests were generated"
        assert not failures, failures[:5]
    finally:
        server.stop()
