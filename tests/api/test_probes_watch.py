"""Watching probes cheaply: ETag/304 on a probe, the compact list, and what the form offers.

Route logic, so in process (the module's `client`); the body limit, which is the wire's, is tested
against a real uvicorn in test_hostile_input.py."""

from __future__ import annotations

import json

from tests.api.conftest import FAST_JOB, wait_for


def test_a_poll_with_the_etag_gets_an_empty_304_until_the_probe_changes(client):
    job_id = client.post("/v1/probes", json={**FAST_JOB, "reuse": False}).json()["id"]
    etags = set()
    while True:
        response = client.get(f"/v1/probes/{job_id}")
        etags.add(response.headers["ETag"])
        if response.json()["status"] == "succeeded":
            break
    assert len(etags) > 1, "the ETag moves as phases and trials arrive"
    # the version is read before the body: the poll that first showed "succeeded" may carry the ETag from just
    # before the change (older, never newer, so a client fetches once more). Finished, the job changes no more:
    response = client.get(f"/v1/probes/{job_id}")

    unchanged = client.get(f"/v1/probes/{job_id}", headers={"If-None-Match": response.headers["ETag"]})
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["ETag"] == response.headers["ETag"]
    stale = client.get(f"/v1/probes/{job_id}", headers={"If-None-Match": '"an-old-one"'})
    assert stale.status_code == 200 and stale.json()["trials"]
    assert client.get("/v1/probes/nope", headers={"If-None-Match": "*"}).status_code == 404


def test_the_compact_list_carries_what_a_table_shows_without_trials_or_report(client):
    job = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    row = next(r for r in client.get("/v1/probes", params={"view": "compact"}).json()["items"]
               if r["id"] == job["id"])
    assert "trials" not in row and "report" not in row
    assert len(json.dumps(row)) < 1000
    assert (row["max_micro_batch"], row["safe_micro_batch"]) == (job["report"]["search"]["max_micro_batch"],
                                                                 job["report"]["search"]["safe_micro_batch"])
    assert row["plan"]["effective_batch"] == job["plan"]["effective_batch"]
    # the list writes the plan as the page and the CLI do: its one equation, not numbers of its own
    assert row["plan"]["equation"] == job["plan"]["equation"] and " micro × " in row["plan"]["equation"]
    assert row["verified"] == job["verification"]["passed"]


def test_models_offers_builtins_presets_and_gpu_cards(client):
    models = client.get("/v1/models").json()
    assert "builtin:gpt-nano" in models["builtins"]
    assert any(p["model"] == "preset:gpt2" for p in models["presets"])
    assert all(g["capacity_bytes"] > 0 for g in models["gpus"])
