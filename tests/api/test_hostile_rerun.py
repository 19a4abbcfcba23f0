"""The held-out hostile rerun (issue 33, bench/results/hostile-rerun-2026-12-06.md): each finding's request,
answered as it is now."""

from __future__ import annotations

import threading

import pytest

from tests.api.conftest import in_process

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256}
ESTIMATE = {"seq_len": 32, "mode": "estimate", "capacity_bytes": 1 << 30, "reuse": False}
# a constructor loop no size limit names (a layer type per `first_k_dense_replace`): ~80 s of building
LOOPING = {**LLAMA, "model_type": "cohere2_moe", "first_k_dense_replace": 10**7}


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    with in_process(tmp_path_factory.mktemp("rerun") / "data", model_build_timeout_s="10") as client:
        yield client


@pytest.mark.parametrize(("model", "field"), [
    ({**LLAMA, "num_labels": 10**7}, "model.num_labels"),
    ({"model_type": "gemma3", "text_config": {**LLAMA, "model_type": "gemma3_text", "num_labels": 10**7}},
     "model.text_config.num_labels"),
])
def test_a_label_count_past_ten_thousand_is_422_naming_the_field(door, model, field):
    # transformers names every label in the config's constructor: 10⁷ took 26 s and 3 GB in the server
    refused = door.post("/v1/probes", json={"model": model, **ESTIMATE})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"].startswith(f"{field} must be ≤ 10,000"), refused.text


@pytest.mark.slow  # the sizing process imports transformers (~8 s), is killed at 10 s, and starts again
def test_a_config_constructor_that_loops_on_an_unbounded_field_is_stopped_by_the_build_timeout(door):
    # cohere2_moe makes a layer type per `first_k_dense_replace`, a field no size limit names: 10⁷ ran
    # ~80 s in the server's own request thread; the sizing process's timeout ends it now
    looping = door.post("/v1/probes", json={"model": LOOPING, **ESTIMATE})
    assert looping.status_code == 422, looping.text
    assert "longer than 10 s" in looping.json()["detail"], looping.text
    assert "FITPROBE_MODEL_BUILD_TIMEOUT_S" in looping.json()["detail"], looping.text
    # a plain config is still queued: the sizer came back
    queued = door.post("/v1/probes", json={"model": LLAMA, **ESTIMATE})
    assert queued.status_code == 202, queued.text
    door.delete(f"/v1/probes/{queued.json()['id']}")


def test_a_preflight_without_a_batch_to_plan_is_422_and_queues_nothing(door):
    # it used to run the whole probe and then answer 409 `FAIL: the probe made no plan`
    before = door.get("/v1/probes").json()["total"]
    refused = door.post("/v1/preflight", json={"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32",
                                               "capacity_bytes": 16 << 20, "timeout_s": 60})
    assert refused.status_code == 422, refused.text
    assert "effective_batch" in refused.json()["detail"], refused.text
    assert door.get("/v1/probes").json()["total"] == before


@pytest.mark.slow  # two builds stopped at 10 s, each followed by a new sizing process (~8 s)
def test_one_client_cannot_hold_the_model_sizer_from_the_others(tmp_path):
    # nine slow configs from one client held the sizer four minutes, and every other client's config was a 429
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    answers: dict[str, list[int]] = {"alice": [], "bob": []}
    with in_process(tmp_path / "data", api_tokens="alice,bob", model_build_timeout_s="10") as client:
        def submit(who: str, headers: dict[str, str], model: dict) -> None:
            answer = client.post("/v1/probes", json={"model": model, **ESTIMATE}, headers=headers)
            answers[who].append(answer.status_code)
            if answer.status_code == 429:
                assert "this client already has 2 model configs waiting" in answer.json()["detail"]
            if answer.status_code == 202:
                client.delete(f"/v1/probes/{answer.json()['id']}", headers=headers)

        threads = [threading.Thread(target=submit, args=("alice", alice, {**LOOPING, "first_k_dense_replace": 10**7 + i}))
                   for i in range(3)] + [threading.Thread(target=submit, args=("bob", bob, LLAMA))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(answers["alice"]) == [422, 422, 429], answers
    assert answers["bob"] == [202], answers
