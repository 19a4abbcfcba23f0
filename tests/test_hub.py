"""hf:org/name reads only config.json, from Hugging Face's own cache, and never runs a repo's code."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir

from fitprobe.probe.models.hub import parse_hub_id, read_config
from fitprobe.probe.job import run_trial
from fitprobe.probe.models.load import build_model
from fitprobe.probe.spec import ProbeSpec, SpecError
from tests.api.conftest import free_port, start_server, wait_for

TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 512}
MAIN_COMMIT, V1_COMMIT = "a" * 40, "b" * 40


def cache_config(cache: Path, repo_id: str, config: dict, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """Lay out config.json as hf_hub_download leaves it: a blob named by its etag (for a file kept in
    git, its git blob id), a snapshot per commit whose config.json links to the blob, refs naming commits."""
    content = json.dumps(config).encode()
    etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / etag).write_bytes(content)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(Path("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """testorg/tiny-llama cached at two commits (main: 2 layers, tag v1: 3 layers), downloads off."""
    cache = tmp_path / "hub"
    cache_config(cache, "testorg/tiny-llama", TINY_LLAMA, MAIN_COMMIT)
    cache_config(cache, "testorg/tiny-llama", {**TINY_LLAMA, "num_hidden_layers": 3}, V1_COMMIT, refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def no_hub_calls(monkeypatch):
    """Fails the test if anything reaches for the Hub's metadata endpoint."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr("huggingface_hub.file_download.get_hf_file_metadata", refuse)


def test_the_test_cache_is_the_layout_huggingface_hub_reads(hub_cache):
    repos = {repo.repo_id: repo for repo in scan_cache_dir(hub_cache).repos}
    revisions = {rev.commit_hash: rev for rev in repos["testorg/tiny-llama"].revisions}
    assert revisions[MAIN_COMMIT].refs == {"main"} and revisions[V1_COMMIT].refs == {"v1"}
    assert [f.file_name for f in revisions[MAIN_COMMIT].files] == ["config.json"]


def test_hub_id_builds_from_the_cache_without_asking_the_hub(hub_cache, no_hub_calls):
    model = build_model(ProbeSpec(precision="fp32", model="hf:testorg/tiny-llama", seq_len=16), "cpu")
    assert model.module.config.num_hidden_layers == 2 and model.vocab_size == 256 and model.max_seq_len == 512
    trial = run_trial(ProbeSpec(precision="fp32", model="hf:testorg/tiny-llama", seq_len=16, capacity_bytes="64MiB"),
                      2).as_json()["trial"]
    assert trial["fits"]


@pytest.mark.parametrize("revision,layers", [("v1", 3), ("main", 2), (V1_COMMIT, 3)])
def test_revision_picks_the_snapshot_by_ref_or_commit(hub_cache, no_hub_calls, revision, layers):
    assert read_config(f"testorg/tiny-llama@{revision}")["num_hidden_layers"] == layers


def test_uncached_id_offline_says_it_is_not_cached_and_how_to_fetch_it(hub_cache, no_hub_calls):
    with pytest.raises(SpecError) as raised:
        build_model(ProbeSpec(precision="fp32", model="hf:testorg/absent", seq_len=16), "meta")
    message = str(raised.value)
    assert "not in the local Hugging Face cache" in message
    assert "hf download testorg/absent config.json" in message and "huggingface-cli download" in message
    assert "HF_HUB_OFFLINE is set (unset it" in message and "HF_TOKEN" in message


def test_an_unreachable_hub_is_one_line_in_seconds_that_does_not_blame_hf_hub_offline(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": os.getcwd()}
    env.pop("HF_HUB_OFFLINE", None)
    started_s = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "fitprobe.probe.cli", "probe", "--model", "hf:testorg/absent", "--seq-len",
                          "16", "--precision", "fp32", "--estimate", "--gpu", "a100-80gb"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert time.monotonic() - started_s < 20, "no minute of retries"
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert f"the Hub at {env['HF_ENDPOINT']} could not be reached (Connection refused)" in run.stderr
    assert "HF_HUB_OFFLINE" not in run.stderr, "it is not set: the line must not tell the user to unset it"


def test_unknown_revision_offline_is_not_cached_either(hub_cache, no_hub_calls):
    with pytest.raises(SpecError, match=r"not in the local Hugging Face cache.*--revision v2"):
        read_config("testorg/tiny-llama@v2")


def test_a_directory_or_its_config_json_is_read_from_disk(tmp_path, monkeypatch, no_hub_calls):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY_LLAMA))
    monkeypatch.chdir(tmp_path)
    for ref in ("hf:tiny", "hf:./tiny", f"hf:{tmp_path / 'tiny'}", f"hf:{tmp_path / 'tiny' / 'config.json'}"):
        assert build_model(ProbeSpec(precision="fp32", model=ref, seq_len=16), "meta").vocab_size == 256
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"holds no config.json"):
        read_config("empty")
    with pytest.raises(SpecError, match="not found"):
        read_config("./missing/config.json")


@pytest.mark.parametrize("ref", ["gpt2", "org/na me", "org/a--b", "org/a..b", "-org/name", "org/name.git",
                                 "org/" + "x" * 97, "org/name@../../etc", "org/name@", "org/name@-x", "org/name@a b"])
def test_malformed_hub_ids_are_refused_before_any_lookup(hub_cache, no_hub_calls, monkeypatch, ref):
    def refuse(*args, **kwargs):
        raise AssertionError("hf_hub_download was called")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    with pytest.raises(SpecError, match=r"Hub id|revision must be"):
        read_config(ref)


def test_parse_hub_id_keeps_revisions_with_slashes():
    assert str(parse_hub_id("Qwen/Qwen2.5-0.5B@refs/pr/1")) == "Qwen/Qwen2.5-0.5B@refs/pr/1"
    assert parse_hub_id("meta-llama/Llama-3.2-1B").revision is None


def test_configs_whose_architecture_is_code_in_the_repo_are_refused(hub_cache, no_hub_calls):
    custom = {"model_type": "tinything", "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                                                      "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}
    cache_config(hub_cache, "testorg/custom-code", custom, MAIN_COMMIT)
    with pytest.raises(SpecError, match="never runs a repository's code"):
        build_model(ProbeSpec(precision="fp32", model="hf:testorg/custom-code", seq_len=16), "meta")
    # an auto_map left beside a model_type transformers ships (as Phi-3's repos have) needs no repo code
    known = {**TINY_LLAMA, "auto_map": {"AutoConfig": "configuration_llama.LlamaConfig"}}
    cache_config(hub_cache, "testorg/known-code", known, MAIN_COMMIT)
    assert build_model(ProbeSpec(precision="fp32", model="hf:testorg/known-code", seq_len=16), "meta").vocab_size == 256


@pytest.fixture
def offline_service(hub_cache, tmp_path, monkeypatch):
    # the server is offline by its setting alone: HF_HUB_OFFLINE is not passed on, and an endpoint that
    # refuses connections would turn any attempt to reach the Hub into an error, not a hang
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "service").mkdir()
    server = start_server(tmp_path / "service" / "data", hub_access="offline")
    yield server
    server.stop()


@pytest.mark.slow
def test_service_resolves_a_cached_hub_id_pins_its_commit_and_runs_it(offline_service):
    body = {"model": "hf:testorg/tiny-llama", "seq_len": 16, "precision": "fp32", "capacity_bytes": 32 << 20, "effective_batch": 4}
    with offline_service.client() as client:
        response = client.post("/v1/probes", json=body)
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["spec"]["model"] == f"hf:testorg/tiny-llama@{MAIN_COMMIT}"
        done = wait_for(client, job["id"], ("succeeded", "failed"))
        assert done["status"] == "succeeded", done["error"]
        assert done["report"]["model"]["vocab_size"] == 256
        tagged = client.post("/v1/probes", json={**body, "model": "hf:testorg/tiny-llama@v1"}).json()
        assert tagged["spec"]["model"] == f"hf:testorg/tiny-llama@{V1_COMMIT}" and not tagged.get("cached")


def test_service_refuses_uncached_ids_and_paths_with_what_to_do(offline_service):
    with offline_service.client() as client:
        uncached = client.post("/v1/probes", json={"model": "hf:testorg/absent", "seq_len": 16})
        assert uncached.status_code == 422
        detail = uncached.json()["detail"]
        assert "not in the local Hugging Face cache" in detail and "hf download testorg/absent config.json" in detail
        assert "HF_TOKEN" in detail
        for path in ("hf:/etc/hosts", "hf:./config.json", "hf:../x", "hf:a/b/c"):
            refused = client.post("/v1/probes", json={"model": path, "seq_len": 16})
            assert refused.status_code == 422 and "reads the server's files" in refused.json()["detail"], path
        malformed = client.post("/v1/probes", json={"model": "hf:org/a--b", "seq_len": 16})
        assert malformed.status_code == 422 and "not a Hub id" in malformed.json()["detail"]


def test_online_service_that_cannot_reach_the_hub_says_so(hub_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "online").mkdir()
    server = start_server(tmp_path / "online" / "data", hub_access="online")
    try:
        with server.client() as client:
            cached = client.post("/v1/probes", json={"model": "hf:testorg/tiny-llama", "seq_len": 16, "reuse": False})
            assert cached.status_code == 202 and cached.json()["spec"]["model"].endswith(MAIN_COMMIT)
            client.delete(f"/v1/probes/{cached.json()['id']}")
            absent = client.post("/v1/probes", json={"model": "hf:testorg/absent", "seq_len": 16})
            assert absent.status_code == 422 and "the Hub at http://127.0.0.1:9 could not be reached" in \
                absent.json()["detail"]
    finally:
        server.stop()


def test_hub_access_defaults_to_offline():
    from fitprobe.app.config import Settings

    assert Settings().hub_access == "offline"
    with pytest.raises(ValueError):
        Settings(hub_access="anywhere")
