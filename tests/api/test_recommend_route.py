"""POST /v1/recommendations: a recommendation is a job like a what-if table (queued → running → succeeded,
polled, streamed, cancellable), bounded at the door, and each candidate answers what its own estimated probe
answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

from fitprobe.app.config import Settings
from fitprobe.app.main import create_app
from fitprobe.probe.job import run_probe
from fitprobe.probe.spec import ProbeSpec

# pure bf16 and Adafactor leave one axis on a builtin model (no TRL head there): checkpointing off and on
SMALL = {"model": "builtin:gpt-nano", "seq_len": 64, "capacity_bytes": "12MiB", "precision": "bf16",
         "optimizer": "adafactor"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data_dir: Path = tmp_path_factory.mktemp("recommend") / "data"
    settings = Settings(data_dir=data_dir, max_recommend_candidates=20, poll_interval_s=0.1)
    with TestClient(create_app(settings), base_url="http://localhost") as test_client:
        yield test_client


def wait_for(client: TestClient, job_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/recommendations/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"recommendation {job_id} never finished: {job}")


@pytest.mark.slow  # two candidates and their two single estimates: ~20 s on the shared 2-core host
def test_a_recommendation_runs_as_a_job_and_each_candidate_is_its_own_estimate(client):
    submitted = client.post("/v1/recommendations", json=SMALL)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"] == f"/v1/recommendations/{job_id}"
    assert submitted.json()["spec"]["mode"] == "estimate" and submitted.json()["recommendation"] is None
    job = wait_for(client, job_id)
    assert job["status"] == "succeeded", job["error"]
    answer = job["recommendation"]
    assert job["progress"] == {"done": 2, "total": 2} and len(answer["candidates"]) == 2
    for candidate in answer["candidates"]:
        single = run_probe(ProbeSpec(**{**SMALL, "mode": "estimate", **candidate["settings"]})).search
        assert (candidate["max_micro_batch"], candidate["safe_micro_batch"]) == (
            single.max_micro_batch, single.safe_micro_batch), candidate["label"]
    first = answer["candidates"][answer["first_fitting"]]
    assert first["safe_micro_batch"] >= 1 and answer["first_fitting"] == 0
    openapi = client.get("/openapi.json").json()
    documented = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/RecommendJob", **openapi})
    assert not list(documented.iter_errors(job))
    with client.stream("GET", f"/v1/recommendations/{job_id}/events") as stream:
        text = "".join(stream.iter_text())
    answered = [json.loads(line.removeprefix("data: ")) for block in text.split("\n\n")
                if "event: recommend_candidate" in block for line in block.splitlines() if line.startswith("data: ")]
    assert [event["done"] for event in answered] == [1, 2]
    assert text.rstrip().endswith('data: {"status": "succeeded"}')
    listed = client.get("/v1/recommendations").json()
    assert job_id in [item["id"] for item in listed["items"]]


@pytest.mark.parametrize("body,words", [
    ({"model": "builtin:gpt-nano", "seq_len": 64}, "estimate mode needs a capacity: set capacity_bytes"),
    # full fine-tuning, bf16-mixed, fused AdamW on 2 devices: 2 × 2 × 4 × 2 (FSDP) = 32 candidates > 20
    ({"model": "builtin:gpt-nano", "seq_len": 64, "capacity_bytes": "12MiB", "num_devices": 2},
     "32 candidates, more than this service's 20"),
    ({"model": "builtin:gpt-nano", "seq_len": 64, "capacity_bytes": "12MiB", "precision": "fp16-mixed"}, "fp16"),
], ids=["no-card", "too-many-candidates", "not-estimable"])
def test_the_door_refuses_what_it_will_not_estimate_with_the_fix(client, body, words):
    refused = client.post("/v1/recommendations", json=body)
    assert refused.status_code == 422, refused.text
    assert words in refused.json()["detail"]


def test_a_full_fine_tune_whose_fp32_weights_exceed_the_card_is_let_in_for_its_pure_bf16_candidates(client):
    from tests.api.test_whatif_route import LLAMA, _parameters

    # a card between the model's bf16 weights and its fp32 master weights: pure bf16 keeps full fine-tuning and
    # holds its weights, so the recommendation is worth running; below the bf16 weights only a method change
    # (QLoRA's 4-bit base) would, and only when the request allows it
    parameters = _parameters(LLAMA)
    body = {"model": LLAMA, "seq_len": 32, "capacity_bytes": 3 * parameters, "gradient_checkpointing": True,
            "trainer": "trl", "optimizer": "adafactor"}
    submitted = client.post("/v1/recommendations", json=body)
    assert submitted.status_code == 202, submitted.text
    assert client.delete(f"/v1/recommendations/{submitted.json()['id']}").json()["status"] == "cancelled"
    below_bf16 = {**body, "capacity_bytes": parameters}
    refused = client.post("/v1/recommendations", json=below_bf16)
    assert refused.status_code == 422 and "weights alone" in refused.json()["detail"]
    allowed = client.post("/v1/recommendations", json={**below_bf16, "allow_method_change": True})
    assert allowed.status_code == 202, allowed.text
    assert client.delete(f"/v1/recommendations/{allowed.json()['id']}").json()["status"] == "cancelled"
