"""The door (issue 33): what one request may cost the server before its quota or bounds answer it."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest

from fitprobe.app import migrate
from fitprobe.app.routes import probes
from fitprobe.app.store import Store
from fitprobe.probe.data import padded_width_ratio
from fitprobe.probe.spec import ProbeSpec
from tests.api.conftest import in_process, start_server

# an estimate finishes in seconds; its search is what the cache keeps, whatever the effective batch
ESTIMATE = {"model": "builtin:gpt-nano", "seq_len": 32, "mode": "estimate", "capacity_bytes": 16 << 20,
            "collation": "padded", "data": {"rows_by_length": {"8": 3, "20": 2, "32": 1}}}


def _finished(client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/probes/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


@pytest.mark.slow  # one estimate (~15 s on the shared 2-core machine)
def test_a_client_at_its_submit_quota_is_answered_429_before_its_cached_answer_is_re_planned(tmp_path, monkeypatch):
    replanned: list[int | None] = []
    real = probes._replan
    monkeypatch.setattr(probes, "_replan", lambda cached, request: replanned.append(request.effective_rows)
                        or real(cached, request))
    with in_process(tmp_path / "data", max_submits_per_client_per_minute="2") as client:
        first = client.post("/v1/probes", json={**ESTIMATE, "effective_batch": 8})
        assert first.status_code == 202, first.text
        assert _finished(client, first.json()["id"])["status"] == "succeeded"
        second = client.post("/v1/probes", json={**ESTIMATE, "effective_batch": 6})
        assert second.status_code == 202 and second.json()["cached"], second.text
        assert replanned == [6]
        for path in ("/v1/probes", "/v1/preflight"):
            refused = client.post(path, json={**ESTIMATE, "effective_batch": 4})
            assert refused.status_code == 429, refused.text
            assert "FITPROBE_MAX_SUBMITS_PER_CLIENT_PER_MINUTE=2" in refused.json()["detail"]
        assert replanned == [6]  # neither refusal planned anything


@pytest.mark.parametrize("seq_len", [40, 4096])
def test_the_padded_width_of_a_batch_is_the_expected_longest_row_summed_over_every_width(seq_len):
    # the definition by hand: E[max of b rows] = Σ_{x < width} (1 - F(x)^b), F(x) the share of rows ≤ x
    rng = np.random.default_rng(0)
    lengths = rng.choice(np.arange(1, seq_len + 200), size=min(seq_len, 300), replace=False)
    rows = {str(int(length)): int(rng.integers(1, 50)) for length in lengths}
    spec = ProbeSpec.model_validate({"model": "builtin:gpt-nano", "seq_len": seq_len, "collation": "padded",
                                     "data": {"rows_by_length": rows}})
    width = min(max(int(k) for k in rows), seq_len)
    total = sum(rows.values())
    at_most = [sum(n for k, n in rows.items() if min(int(k), width) <= x) / total for x in range(width)]
    ratio = padded_width_ratio(spec)
    assert ratio is not None
    for b in (1, 2, 7, 300, 65_536):
        expected = sum(1 - f ** b for f in at_most) / width
        assert ratio(b) == pytest.approx(expected, rel=1e-12, abs=1e-15)


# each builds in seconds on meta, but far beyond 2×10¹² parameters; the config arithmetic read none of these
# fields (or only the top level of a nested config), and all were queued
HIDDEN_GIANTS = {
    "bart decoder_ffn_dim": {"model_type": "bart", "decoder_ffn_dim": 10**9},
    "mamba expand": {"model_type": "mamba", "expand": 10**6},
    "opt word_embed_proj_dim": {"model_type": "opt", "word_embed_proj_dim": 10**9},
    "gemma3 nested text_config": {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "num_hidden_layers": 64, "hidden_size": 65_536, "intermediate_size": 262_144,
        "num_attention_heads": 64, "num_key_value_heads": 64, "head_dim": 1024}},
}


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    with in_process(tmp_path_factory.mktemp("door") / "data", model_build_timeout_s="8") as client:
        yield client


@pytest.mark.slow  # the sizing process imports transformers (~8 s) and builds five models on meta
def test_a_model_is_bounded_by_what_its_config_builds_whatever_its_fields_are_called(door):
    for name, config in HIDDEN_GIANTS.items():
        refused = door.post("/v1/probes", json={"model": config, "seq_len": 16, "mode": "estimate",
                                                "capacity_bytes": 1 << 50})
        assert refused.status_code == 422, (name, refused.text)
        detail = refused.json()["detail"]
        assert "about " in detail, (name, detail)
        counted = int(detail.split("about ")[1].split(" parameters")[0].replace(",", ""))
        assert counted > 2 * 10**12 and "FITPROBE_MAX_MODEL_PARAMS" in detail, (name, detail)
    # tens of thousands of small layers (a few hundred million parameters, under every bound by arithmetic):
    # building them takes about a minute, so the build is stopped at the service's limit (3,000 default-width
    # layers built inside the 8 s on an idle host)
    slow = door.post("/v1/probes", json={"model": {"model_type": "bart", "decoder_layers": 30000, "d_model": 16,
                                                   "decoder_ffn_dim": 32, "decoder_attention_heads": 2},
                                         "seq_len": 16, "mode": "estimate", "capacity_bytes": 1 << 50})
    assert slow.status_code == 422, slow.text
    assert "longer than 8 s" in slow.json()["detail"] and "FITPROBE_MODEL_BUILD_TIMEOUT_S" in slow.json()["detail"]
    # and the sizer still answers after its process was killed: a small config of the same family is queued
    small = door.post("/v1/probes", json={"model": {"model_type": "bart", "decoder_layers": 2, "d_model": 64,
                                                    "decoder_ffn_dim": 128, "decoder_attention_heads": 4,
                                                    "vocab_size": 1000}, "seq_len": 16, "mode": "estimate",
                                          "capacity_bytes": 1 << 30, "reuse": False})
    assert small.status_code == 202, small.text
    door.delete(f"/v1/probes/{small.json()['id']}")


def test_a_body_declared_to_a_route_that_never_reads_it_ends_with_the_answer(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\nx".encode())
        answer, closed = b"", False
        while not closed:  # the server closes; a connection it kept would time out here (socket.timeout)
            try:
                chunk = sock.recv(65536)
                answer += chunk
                closed = not chunk
                sock.sendall(b"x")  # the client dribbles the rest of its body
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()


@pytest.mark.parametrize("rows_by_length, says", [
    ({"8": 1, "08": 5}, "plain decimal digits"),  # merged into {8: 6} before
    ({"+8": 1}, "plain decimal digits"),
    ({"8": "3"}, "JSON integer"),
    ({"8": True}, "JSON integer"),
])
def test_data_lengths_are_plain_decimal_keys_with_integer_counts(door, rows_by_length, says):
    refused = door.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 16,
                                            "data": {"rows_by_length": rows_by_length}})
    assert refused.status_code == 422 and says in refused.text, refused.text


def test_a_whatif_table_asks_no_seq_len_beyond_the_model_or_the_service(door):
    table = {"model": "builtin:gpt-nano", "gpu": "a100-80gb", "finetuning": ["full"], "checkpointing": ["off"],
             "optimizers": ["adamw_torch"]}
    beyond_model = door.post("/v1/whatif", json={**table, "seq_lens": [64, 4096]})  # gpt-nano: 2048 positions
    assert beyond_model.status_code == 422
    assert "seq_len 4096 exceeds this model's context of 2048 tokens" in beyond_model.json()["detail"]
    # the longest-sequence search stops at the service's largest seq_len, however long the model's context
    accepted = door.post("/v1/whatif", json={**table, "seq_lens": [64], "longest_up_to": 131_072})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["spec"]["longest_up_to"] == 32_768
    door.delete(f"/v1/whatif/{accepted.json()['id']}")


def test_queued_jobs_are_claimed_one_client_at_a_time_not_first_in_first_out(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'fitprobe.db'}")
    migrate.upgrade(store.engine)
    queued = [(client, store.create({"seed": n}, f"fp{n}", 100, client=client)["id"])
              for n, client in enumerate(["alice"] * 4 + ["bob", "carol", "bob"])]
    order = []
    while (job := store.claim_next("cpu")) is not None:
        order.append(next(client for client, job_id in queued if job_id == job["id"]))
        store.succeed(job["id"], {})
    assert order == ["alice", "bob", "carol", "alice", "bob", "alice", "alice"]


def test_the_sweep_bounds_the_stored_bytes_not_only_the_row_count(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'fitprobe.db'}")
    migrate.upgrade(store.engine)
    profile = {"data": {"rows_by_length": {str(n): 1 for n in range(1, 20_000)}}}  # ~230 KB as JSON
    ids = [store.create_cached({**profile, "seed": n}, f"fp{n}", {"n": n})["id"] for n in range(6)]
    row_bytes = len(json.dumps(store.get(ids[0])["spec"]))  # one profile per row, as stored
    # room for three and a half rows: the three oldest go, newest kept
    assert store.sweep(retention_days=30, max_stored=10_000, max_stored_bytes=int(3.5 * row_bytes)) == 3
    assert [store.version(job_id) is not None for job_id in ids] == [False] * 3 + [True] * 3  # the oldest went


def test_synchronous_plans_have_a_per_client_quota(tmp_path):
    with in_process(tmp_path / "data", max_plans_per_client_per_minute="3") as client:
        codes = [client.post("/v1/plans", json={"effective_batch": 64, "max_micro_batch": 8}).status_code
                 for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = client.post("/v1/plans", json={"effective_batch": 64, "max_micro_batch": 8})
        assert "FITPROBE_MAX_PLANS_PER_CLIENT_PER_MINUTE=3" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) > 0


def test_one_machine_is_one_client_whichever_loopback_address_it_sends_from(tmp_path):
    server = start_server(tmp_path / "data", max_plans_per_client_per_minute="2")
    try:
        codes = []
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            with httpx.Client(base_url=server.url, transport=httpx.HTTPTransport(local_address=source)) as client:
                codes.append(client.post("/v1/plans", json={"effective_batch": 8, "max_micro_batch": 2}).status_code)
        assert codes == [200, 200, 429]
    finally:
        server.stop()


def test_a_generation_asks_no_tokens_beyond_the_model_or_the_door(door):
    """The prompt and the new tokens together must fit the model's positions; max_new_tokens has its own bound."""
    model = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512}
    beyond = door.post("/v1/probes", json={"model": model, "seq_len": 256, "generate": True, "max_new_tokens": 512})
    assert beyond.status_code == 422
    assert "seq_len + max_new_tokens (256 + 512) exceeds this model's context of 512" in beyond.json()["detail"]
    too_many = door.post("/v1/probes", json={"model": model, "seq_len": 16, "generate": True,
                                             "max_new_tokens": 100_000})
    assert too_many.status_code == 422 and "max_new_tokens" in too_many.text


def test_an_estimated_generation_past_its_decode_bound_is_refused_at_the_door_before_any_trial(door):
    """An estimate decodes each new token through every layer on fake tensors: layers × new tokens ≤ 4096. Llama-3.1-8B
    has 32 layers (its config), so 128 new tokens pass and 256 do not, before the training search spends minutes."""
    before = door.get("/v1/probes").json()["total"]
    asked = {"model": "preset:llama-3.1-8b", "seq_len": 512, "mode": "estimate", "gpu": "h100-80gb", "generate": True}
    refused = door.post("/v1/probes", json={**asked, "max_new_tokens": 256})
    assert refused.status_code == 422
    assert "32 layers each: max_new_tokens 256 is past the 128" in refused.json()["detail"]
    assert "lower max_new_tokens" in refused.json()["detail"]
    # an inline config is bounded by its own layer count (8 × 1024 > 4096) as the job would bound it
    model = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 2048}
    inline = door.post("/v1/probes", json={"model": model, "seq_len": 16, "mode": "estimate",
                                           "capacity_bytes": 1 << 30, "generate": True, "max_new_tokens": 1024})
    assert inline.status_code == 422 and "past the 512" in inline.json()["detail"]
    assert door.get("/v1/probes").json()["total"] == before  # nothing refused was queued
