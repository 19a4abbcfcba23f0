"""GET /v1/probes/{id}/config: a finished probe's plan as a framework's config (route logic: in process)."""

from __future__ import annotations

from tests.api.conftest import FAST_JOB, SLOW_JOB, wait_for


def test_a_succeeded_probe_exports_its_plan_in_every_format(client):
    from transformers import TrainingArguments

    job = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    plan, search = job["plan"], job["report"]["search"]
    hf = client.get(f"/v1/probes/{job['id']}/config", params={"format": "hf"})
    assert hf.status_code == 200
    exported = hf.json()
    assert exported.keys() == {"format", "config", "provenance"} and exported["format"] == "hf"
    # the config is what a user unpacks: TrainingArguments takes it as it comes
    args = TrainingArguments(**exported["config"])
    # FAST_JOB asks for 24 on one device: what HF Trainer multiplies must give 24
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 24
    assert exported["provenance"]["safe_micro_batch"] == search["safe_micro_batch"]
    assert exported["provenance"]["verified"] is job["verification"]["passed"]
    deepspeed = client.get(f"/v1/probes/{job['id']}/config", params={"format": "deepspeed"}).json()
    assert deepspeed["config"]["train_batch_size"] == plan["effective_batch"] == 24
    for fmt in ("accelerate", "lightning", "axolotl", "torchtune"):
        assert client.get(f"/v1/probes/{job['id']}/config", params={"format": fmt}).status_code == 200


def test_config_errors_say_what_is_wrong(client):
    assert client.get("/v1/probes/no-such-id/config", params={"format": "hf"}).status_code == 404
    done = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    unknown = client.get(f"/v1/probes/{done['id']}/config", params={"format": "keras"})
    assert unknown.status_code == 422
    assert all(fmt in unknown.json()["detail"] for fmt in ("hf", "accelerate", "deepspeed", "torchtune"))

    no_plan = {key: value for key, value in FAST_JOB.items() if key != "effective_batch"}
    probed = wait_for(client, client.post("/v1/probes", json=no_plan).json()["id"], ("succeeded",))
    answer = client.get(f"/v1/probes/{probed['id']}/config", params={"format": "hf"})
    assert answer.status_code == 409 and "effective_batch" in answer.json()["detail"]

    slow = client.post("/v1/probes", json=SLOW_JOB).json()
    unfinished = client.get(f"/v1/probes/{slow['id']}/config", params={"format": "hf"})
    assert unfinished.status_code == 409 and "succeeded" in unfinished.json()["detail"]
    client.delete(f"/v1/probes/{slow['id']}")
