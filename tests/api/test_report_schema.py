"""The API documents the report it answers with, and answers with what it documents (route logic: in process).

The expected shape comes from the OpenAPI document the service publishes, checked by a JSON Schema
validator against a real job's body: every key the report holds is a documented one (the schema
forbids others), every documented required key is there, with the documented type.
"""

from __future__ import annotations

import json

import jsonschema

from tests.api.conftest import FAST_JOB, wait_for


def _validator(openapi: dict, component: str) -> jsonschema.Draft202012Validator:
    # OpenAPI 3.1 component schemas are JSON Schema 2020-12; refs point into the same document
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{component}", **openapi})


def test_a_probes_body_is_the_documented_report_and_nothing_else(client):
    openapi = client.get("/openapi.json").json()
    got = openapi["paths"]["/v1/probes/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert got == {"$ref": "#/components/schemas/ProbeJob"}, "GET /v1/probes/{id} documents its body"
    schemas = openapi["components"]["schemas"]
    report = schemas["Report"]["properties"]
    assert {"search", "plan", "verification", "device", "does_not_fit"} <= report.keys()
    assert "max_micro_batch" in schemas["Search"]["properties"] and "equation" in schemas["PlanFacts"]["properties"]
    assert schemas["Report"].get("additionalProperties") is False, "a key the schema does not name is refused"

    job = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    assert job["report"]["plan"] and job["report"]["verification"], "the job planned and verified"
    errors = sorted(_validator(openapi, "ProbeJob").iter_errors(job), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
    # the plan's words are the report's: the top-level plan is the report's plan, equation and all
    assert job["plan"] == job["report"]["plan"] and job["plan"]["equation"].startswith("24 = ")

    listed = client.get("/v1/probes", params={"view": "compact"}).json()
    assert not list(_validator(openapi, "ProbeList").iter_errors(listed))
    assert not list(_validator(openapi, "PlanAnswer").iter_errors(
        client.post("/v1/plans", json={"effective_batch": 97, "max_micro_batch": 32}).json()))


def test_an_undocumented_key_in_a_report_fails_the_schema(client):
    # the check above can fail: the same validator refuses a body with one key the schema does not name
    openapi = client.get("/openapi.json").json()
    job = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    job["report"]["search"]["undocumented"] = 1
    assert any("undocumented" in e.message for e in _validator(openapi, "ProbeJob").iter_errors(job))


def test_a_report_stored_in_an_older_shape_is_shown_with_an_error_not_a_500(client):
    store = client.app.state.store
    old = {"search": {"max_micro_batch": 3}, "plan": {"micro_batch": 3}}  # what an older fitprobe might have kept
    job = store.create_cached(dict(FAST_JOB), "old-shape-fingerprint", old)
    response = client.get(f"/v1/probes/{job['id']}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["report"] is None and body["plan"] is None and "reuse=false" in body["error"]
    listed = client.get("/v1/probes", params={"limit": 200})
    assert listed.status_code == 200 and any(row["id"] == job["id"] for row in listed.json()["items"])
    # its export cannot be read either: a 409 that says what to do
    exported = client.get(f"/v1/probes/{job['id']}/config", params={"format": "hf"})
    assert exported.status_code == 409 and "reuse=false" in exported.json()["detail"]


# spec fields later versions added: a report an older fitprobe stored has none of them
NEWER_SPEC_FIELDS = ("trainer", "liger", "generate", "generate_alone", "generate_batch_size", "max_new_tokens",
                     "cache_implementation", "eval_batch_size")


def test_a_report_whose_stored_spec_lacks_newer_fields_loads_with_their_defaults(client):
    store = client.app.state.store
    probed = wait_for(client, client.post("/v1/probes", json=FAST_JOB).json()["id"], ("succeeded",))
    stored = store.get(probed["id"])["result"]
    older = {**stored, "spec": {key: value for key, value in stored["spec"].items() if key not in NEWER_SPEC_FIELDS}}
    job = store.create_cached(dict(FAST_JOB), "older-spec-fingerprint", older)

    body = client.get(f"/v1/probes/{job['id']}").json()
    assert body["error"] is None and body["plan"] == stored["plan"]
    assert body["report"]["spec"] == stored["spec"], "the missing fields read as the spec's defaults"
    assert (body["report"]["spec"]["trainer"], body["report"]["spec"]["max_new_tokens"]) == ("hf", 128)
    exported = client.get(f"/v1/probes/{job['id']}/config", params={"format": "trl"})
    assert exported.status_code == 200, exported.text
    assert exported.json()["config"]["per_device_train_batch_size"] == stored["plan"]["micro_batch"]


def test_a_report_whose_stored_spec_no_longer_validates_asks_for_a_new_probe_not_a_500(client):
    import sqlalchemy as sa

    from fitprobe.app.store import jobs

    store = client.app.state.store
    request = {**FAST_JOB, "seed": 11}  # a probe of its own: its stored row is the cache the next submit reads
    probed = wait_for(client, client.post("/v1/probes", json=request).json()["id"], ("succeeded",))
    stored = store.get(probed["id"])["result"]
    # an optimizer this version no longer offers: the rest of the report is of this version's shape
    gone = {**stored, "spec": {**stored["spec"], "optimizer": "adamw_apex_fused"}}
    with store.engine.begin() as connection:
        connection.execute(sa.update(jobs).where(jobs.c.id == probed["id"]).values(result=json.dumps(gone)))

    response = client.get(f"/v1/probes/{probed['id']}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["report"] is None and body["plan"] is None and "reuse=false" in body["error"]
    exported = client.get(f"/v1/probes/{probed['id']}/config", params={"format": "hf"})
    assert exported.status_code == 409 and "reuse=false" in exported.json()["detail"]
    # the same request again is not answered from the unreadable row: it is probed afresh
    again = client.post("/v1/probes", json=request)
    assert again.status_code == 202, again.text
    assert again.json()["id"] != probed["id"] and not again.json()["cached"]


def test_a_what_if_table_stored_in_an_older_shape_is_shown_with_an_error_not_a_500(client):
    import sqlalchemy as sa

    from fitprobe.app.store import WHATIF, jobs

    store = client.app.state.store
    job = store.create_cached({"model": "builtin:gpt-nano"}, "old-table-shape", {"rows": "once a string"})
    with store.engine.begin() as connection:
        connection.execute(sa.update(jobs).where(jobs.c.id == job["id"]).values(kind=WHATIF))
    response = client.get(f"/v1/whatif/{job['id']}")
    assert response.status_code == 200, response.text
    assert response.json()["table"] is None and "submit the table again" in response.json()["error"]
    assert client.get("/v1/whatif").status_code == 200
