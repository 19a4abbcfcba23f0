"""POST /v1/whatif: a what-if table is a job like a probe (queued → running → succeeded, polled, streamed,
cancellable), bounded at the door, and each of its cells answers what a single estimated probe answers."""

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
from fitprobe.probe.whatif_spec import WhatIfSpec

SMALL = {"model": "builtin:gpt-nano", "capacity_bytes": "12MiB", "seq_lens": [32, 64], "finetuning": ["full"],
         "checkpointing": ["off"], "optimizers": ["adamw_torch_fused"], "precisions": ["bf16-mixed"]}
# 12 settings (the default finetuning and checkpointing, two optimizers, one precision) on a Llama: minutes of
# estimates, still running when the test cancels it
LLAMA = dict(model_type="llama", vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
LONG = {"model": LLAMA, "capacity_bytes": 24 << 20, "seq_lens": [128, 256, 512],
        "optimizers": ["adamw_torch_fused", "adamw_bnb_8bit"], "precisions": ["bf16-mixed"]}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data_dir: Path = tmp_path_factory.mktemp("whatif") / "data"
    settings = Settings(data_dir=data_dir, max_whatif_seq_lens=4, max_whatif_cells=40, poll_interval_s=0.1)
    with TestClient(create_app(settings), base_url="http://localhost") as test_client:
        yield test_client


def wait_for(client: TestClient, job_id: str, statuses: tuple[str, ...], timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/whatif/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"what-if job {job_id} never reached {statuses}: {job}")


@pytest.mark.slow  # a table of 2 cells and a longest-sequence search: about a minute on a shared 2-core host
def test_a_table_runs_as_a_job_with_one_event_per_cell_and_cells_equal_single_probes(client):
    submitted = client.post("/v1/whatif", json=SMALL)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"] == f"/v1/whatif/{job_id}"
    assert submitted.json()["status"] == "queued" and submitted.json()["table"] is None
    assert submitted.json()["spec"]["capacity_bytes"] == 12 * 2**20

    job = wait_for(client, job_id, ("succeeded", "failed", "cancelled"))
    assert job["status"] == "succeeded", job["error"]
    # 1 setting × (2 seq_lens + its longest sequence)
    assert job["progress"] == {"done": 3, "total": 3}
    table = job["table"]
    assert table["seq_lens"] == [32, 64] and [row["label"] for row in table["rows"]] == [
        "full · no ckpt · bf16-mixed · adamw_torch_fused"]
    for cell in table["rows"][0]["cells"]:
        single = run_probe(ProbeSpec(model="builtin:gpt-nano", seq_len=cell["seq_len"], mode="estimate",
                                     capacity_bytes=12 << 20, precision="bf16-mixed")).as_json()["search"]
        assert (cell["max_micro_batch"], cell["safe_micro_batch"]) == (single["max_micro_batch"],
                                                                      single["safe_micro_batch"])
    assert table["rows"][0]["cells"][0]["max_micro_batch"] > table["rows"][0]["cells"][1]["max_micro_batch"] > 0
    # the body is the one the API documents: the table's schema comes from probe/whatif.py's own records
    openapi = client.get("/openapi.json").json()
    documented = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/WhatIfJob", **openapi})
    assert not list(documented.iter_errors(job)) and openapi["components"]["schemas"]["Cell"]["properties"].keys() >= {
        "seq_len", "max_micro_batch", "peak_bytes", "extrapolated_from_layers"}

    with client.stream("GET", f"/v1/whatif/{job_id}/events") as stream:
        text = "".join(stream.iter_text())
    cells = [json.loads(line.removeprefix("data: ")) for block in text.split("\n\n")
             if "event: whatif_cell" in block for line in block.splitlines() if line.startswith("data: ")]
    assert [cell["done"] for cell in cells] == [1, 2, 3]
    assert text.rstrip().endswith('data: {"status": "succeeded"}')

    listed = client.get("/v1/whatif").json()
    assert job_id in [item["id"] for item in listed["items"]]
    # a what-if job is not a probe: the probe routes neither show nor answer for it
    assert client.get(f"/v1/probes/{job_id}").status_code == 404
    assert job_id not in [item["id"] for item in client.get("/v1/probes").json()["items"]]
    assert client.delete(f"/v1/whatif/{job_id}").status_code == 409  # finished: nothing to cancel


def test_an_oversized_table_is_refused_at_the_door_with_what_to_change(client):
    before = client.get("/v1/whatif").json()["total"]
    # 3 × 2 × 2 × 1 = 12 settings: 4 seq_lens make 48 cells, over this service's 40
    too_many_cells = client.post("/v1/whatif", json={**LONG, "seq_lens": [128, 256, 512, 1024]})
    assert too_many_cells.status_code == 422
    detail = too_many_cells.json()["detail"]
    assert "12 settings × 4 seq_lens = 48 cells" in detail and "FITPROBE_MAX_WHATIF_CELLS" in detail
    assert "drop seq_lens, or narrow finetuning, checkpointing, optimizers or precisions" in detail
    # LONG's 36 cells pass; a second precision alone makes them 72
    two_precisions = client.post("/v1/whatif", json={**LONG, "precisions": ["bf16-mixed", "bf16"]})
    assert two_precisions.status_code == 422
    assert "24 settings × 3 seq_lens = 72 cells" in two_precisions.json()["detail"]
    assert "precisions" in two_precisions.json()["detail"]
    # as does leaving the precisions to their default, bf16 beside bf16-mixed
    default_precisions = client.post("/v1/whatif", json={key: value for key, value in LONG.items() if key != "precisions"})
    assert default_precisions.status_code == 422 and "72 cells" in default_precisions.json()["detail"]

    too_many_columns = client.post("/v1/whatif", json={**SMALL, "seq_lens": [16, 32, 48, 64, 80]})
    assert too_many_columns.status_code == 422 and "seq_lens: at most 4" in too_many_columns.json()["detail"]

    too_long = client.post("/v1/whatif", json={**SMALL, "seq_lens": [32, 40_000]})
    assert too_long.status_code == 422 and "40000" in too_long.json()["detail"]

    no_card = client.post("/v1/whatif", json={key: value for key, value in SMALL.items() if key != "capacity_bytes"})
    assert no_card.status_code == 422 and "give gpu" in no_card.json()["detail"]

    repeated = client.post("/v1/whatif", json={**SMALL, "seq_lens": [32, 32]})
    assert repeated.status_code == 422 and "repeated: 32" in repeated.text
    assert client.get("/v1/whatif").json()["total"] == before  # nothing refused was stored


def test_the_default_rows_at_four_seq_lens_pass_a_default_services_door(tmp_path):
    # 3 finetunings × 2 checkpointing × 2 precisions (bf16 beside bf16-mixed) × 3 optimizers = 36 rows
    request = WhatIfSpec(model="preset:llama-3.1-8b", gpu="h100-80gb", seq_lens=[512, 1024, 2048, 4096])
    assert request.cell_count == 36 * 4 <= Settings(data_dir=tmp_path).max_whatif_cells


def test_cancel_stops_a_running_table_and_frees_the_worker(client):
    job_id = client.post("/v1/whatif", json=LONG).json()["id"]
    job = wait_for(client, job_id, ("running",), timeout_s=120)
    assert job["status"] == "running"
    cancelled = client.delete(f"/v1/whatif/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["table"] is None
    # the worker is free again: the job's process was killed, not left to finish the table
    deadline = time.monotonic() + 30
    while client.app.state.executor.busy_devices() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.app.state.executor.busy_devices() == 0
    assert client.get(f"/v1/whatif/{job_id}").json()["status"] == "cancelled"
    assert client.get("/v1/whatif/no-such-job").status_code == 404


def _parameters(config: dict) -> int:
    """The model's parameter count as transformers builds it (on meta: no memory), tied tensors once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def test_a_table_whose_full_fine_tuning_weights_exceed_the_card_is_let_in_for_its_lighter_rows(client):
    # a card between the model's 16-bit weights (LoRA's frozen base) and its fp32 weights (full fine-tuning at
    # bf16-mixed keeps fp32 master weights): the LoRA row fits its weights, so the table is worth running
    parameters = _parameters(LLAMA)
    capacity = 3 * parameters
    body = {**SMALL, "model": LLAMA, "capacity_bytes": capacity, "seq_lens": [32], "finetuning": ["full", "lora"]}
    submitted = client.post("/v1/whatif", json=body)
    assert submitted.status_code == 202, submitted.text
    assert client.delete(f"/v1/whatif/{submitted.json()['id']}").json()["status"] == "cancelled"
    # with no row but full fine-tuning, no row's weights fit: refused, with what would
    full_only = client.post("/v1/whatif", json={**body, "finetuning": ["full"]})
    assert full_only.status_code == 422
    assert "weights alone" in full_only.json()["detail"] and "--lora" in full_only.json()["detail"]
