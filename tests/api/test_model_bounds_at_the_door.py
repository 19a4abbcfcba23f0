"""Models too big to build are refused at the door of a real server, quickly, without it growing or
stalling: the submit check is arithmetic on the config (probe/models/bounds.py), nothing is built. The
server's own growth and stalls need a real uvicorn; what a route answers is checked in process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Server

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 256}
HOSTILE_CONFIGS = [
    ({"num_hidden_layers": 1e30}, "num_hidden_layers"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"num_hidden_layers": -5}, "num_hidden_layers"),
    ({"vocab_size": 10**9}, "vocab_size"),
    ({"hidden_size": 1_048_576}, "hidden_size"),
    ({"model_type": "mixtral", "num_local_experts": 20_000}, "num_local_experts"),
]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_oversized_and_negative_model_sizes_are_422_fast_and_the_server_neither_grows_nor_stalls(server: Server):
    health_times: list[float] = []
    done = threading.Event()

    def another_client() -> None:
        with server.client() as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                health_times.append(time.monotonic() - started)
                time.sleep(0.05)

    watcher = threading.Thread(target=another_client)
    with server.client() as client:
        client.post("/v1/probes", json={"model": {**LLAMA, "num_hidden_layers": 0}, "seq_len": 32})  # warm imports
        before = _rss_bytes(server.process.pid)
        watcher.start()
        # the bombs answer in milliseconds: let the other client be mid-stream before the first one
        deadline = time.monotonic() + 10
        while not health_times and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            for _ in range(3):
                for fields, field in HOSTILE_CONFIGS:
                    started = time.monotonic()
                    response = client.post("/v1/probes", json={"model": {**LLAMA, **fields}, "seq_len": 32})
                    elapsed = time.monotonic() - started
                    assert response.status_code == 422, response.text
                    assert f"model.{field}" in response.json()["detail"]
                    # refused from arithmetic, never built: far inside the sizer's build timeout (a hang
                    # detector, not a speed goal: the request's speed lives in bench/)
                    assert elapsed < 15, f"{fields} took {elapsed:.1f}s"
        finally:
            done.set()
            watcher.join(timeout=10)
        assert _rss_bytes(server.process.pid) - before < 50 << 20
    assert health_times and max(health_times) < 15  # the other client was never stalled behind the bombs


@pytest.mark.parametrize("seed", [-1, 2**64, int("9" * 4000), 1.5])
def test_a_seed_outside_0_to_2_to_the_63_is_422(client: TestClient, seed):
    response = client.post("/v1/probes", json={"model": "builtin:gpt-nano", "seq_len": 32, "seed": seed})
    assert response.status_code == 422, response.text
    assert "seed" in response.text


def test_lora_targets_naming_no_module_are_422_at_the_door(client: TestClient):
    response = client.post("/v1/probes", json={"model": "preset:gpt2", "seq_len": 32, "finetuning": "lora",
                                               "lora": {"targets": ["q_proj"]}})
    assert response.status_code == 422, response.text
    assert "lora.targets: ['q_proj'] are not modules of this model (gpt2)" in response.json()["detail"]


def test_the_largest_plan_request_answers_with_the_fewest_micro_steps(client: TestClient):
    """Every split from 1 to 65,536 is a candidate here; how long that takes is bench/plan_speed.py's goal.

    By hand: 1,048,575 = 7 × 149,796 + 3, so three devices take 149,797 examples. Micro-batches of at most
    65,536 need ceil(149,797 / 65,536) = 3 micro-steps, and the smallest micro-batch that still needs only
    three is ceil(149,797 / 3) = 49,933 (two of 49,933, then 49,931 on those three devices).
    """
    response = client.post("/v1/plans", json={"effective_batch": 1_048_575, "max_micro_batch": 65_536,
                                              "num_devices": 7})
    assert response.status_code == 200, response.text
    plan = response.json()["plan"]
    assert (plan["effective_batch"], plan["exact"], plan["num_devices"]) == (1_048_575, True, 7)
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["examples_per_device"]) == (49_933, 3, 149_797)
