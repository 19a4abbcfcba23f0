"""Schemathesis over the app's own OpenAPI schema: no request makes it answer 500.

Route logic, so the app runs in process (its lifespan, database and executor as under uvicorn): a
uvicorn start cost more than the fuzzing on the 2-core machine.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.python.asgi import ASGIClient

from tests.api.conftest import in_process


def test_no_generated_request_gets_a_server_error(tmp_path):
    with in_process(tmp_path / "data", max_queued_jobs="1000") as client:
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
        # schemathesis's ASGI session, not entered: requests reach the app whose lifespan `client` runs
        # (entering it would start a second one); the Host is a loopback name, which the app lets through
        session = ASGIClient(client.app)
        failures, calls = [], []
        for operation in schema.get_all_operations():
            op = operation.ok()
            if op.path.endswith("/events") or op.path == "/v1/preflight":
                continue  # an open stream, or a wait for a probe: covered by the end-to-end tests

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy())
            def check(case):
                response = case.call(base_url=str(client.base_url), session=session, timeout=30)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.formatted_path, case.body, response.text[:300]))

            check()
        assert len(calls) >= 100, f"only {len(calls)} requests were generated"
        assert not failures, failures[:5]
