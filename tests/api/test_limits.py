"""One set of limits: the service says its bounds (GET /v1/limits), and takes a card's name as the CLI does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from fitprobe.probe.gpus import gpu_capacity_bytes
from tests.api.conftest import in_process


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    with in_process(tmp_path_factory.mktemp("limits") / "data", max_seq_len="1000") as client:
        yield client


def test_the_limits_the_service_answers_are_the_ones_it_enforces(client):
    limits = client.get("/v1/limits").json()
    assert limits["max_seq_len"] == 1000 and limits["max_effective_batch"] == 65_536
    refused = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 1001})
    assert refused.status_code == 422 and "seq_len must be ≤ 1000 on this service" in refused.json()["detail"]


def test_a_gpu_by_name_sets_the_capacity_of_an_estimate(client):
    job = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "mode": "estimate",
                                          "gpu": "a100-80gb", "reuse": False})
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["capacity_bytes"] == gpu_capacity_bytes("a100-80gb")
    client.delete(f"/v1/probes/{job.json()['id']}")
    measured = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "gpu": "a100-80gb"})
    assert measured.status_code == 422
    assert "gpu a100-80gb plans for a card this machine does not measure: set mode to estimate" in measured.text
    unknown = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "mode": "estimate",
                                              "gpu": "b300"})
    assert unknown.status_code == 422 and "unknown GPU 'b300'; choose one of: t4-16gb" in unknown.text


def test_user_data_arrives_as_row_lengths_never_as_a_path_the_server_would_open(client):
    path = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "data": "/etc/passwd"})
    assert path.status_code == 422 and "data" in path.text
    negative = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32,
                                               "data": {"rows_by_length": {"20": -1}}})
    assert negative.status_code == 422 and "rows of 20 tokens" in negative.text
    job = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "mode": "estimate",
                                          "capacity_bytes": "1GiB", "reuse": False,
                                          "data": {"rows_by_length": {"20": 5, "32": 1}, "source": "chat.jsonl"}})
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["data"] == {"rows_by_length": {"20": 5, "32": 1}, "source": "chat.jsonl"}
    client.delete(f"/v1/probes/{job.json()['id']}")


def test_a_token_budget_is_bounded_at_the_door_in_rows_like_an_effective_batch(client):
    limits = client.get("/v1/limits").json()
    rows = limits["max_effective_batch"] + 1  # one row of seq_len tokens more than the service plans
    refused = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "collation": "packed",
                                              "effective_batch_tokens": rows * 32})
    assert refused.status_code == 422
    assert f"effective_batch_tokens is {rows} rows of seq_len 32; at most {rows - 1} rows" in refused.text
    padded = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "effective_batch_tokens": 64})
    assert padded.status_code == 422 and "use collation packed or flattened" in padded.text
