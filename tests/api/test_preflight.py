"""`fitprobe preflight` as a pipeline runs it: one verdict line, one JSON object, exit codes a CI step can act on."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fitprobe_client.client import FitprobeClient
from tests.api.conftest import SLOW_JOB, free_port

NANO = ("--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--capacity", "16777216")
# a gpt2 small enough to probe and verify in seconds on the CPU device; dropout off because the
# verification compares two cuts of the same examples, and gpt2's default 0.1 dropout draws other masks
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 256, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TINY_GPT2_RUN = ("--seq-len", "32", "--precision", "fp32", "--capacity", "32MiB", "--effective-batch", "8")


def preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitprobe.app.cli", "preflight", *args],
                          capture_output=True, text=True, timeout=300)


def verdict(run: subprocess.CompletedProcess) -> str:
    """The one line stdout holds without --json."""
    lines = run.stdout.splitlines()
    assert len(lines) == 1, run.stdout
    return lines[0]


def test_a_verified_plan_exits_0_with_one_pass_line(server):
    run = preflight("--server", server.url, *NANO, "--effective-batch", "20")
    assert run.returncode == 0, run.stderr
    line = verdict(run)
    assert line.startswith("PASS: 20 = ") and "(verified; peak " in line, line
    assert "[fitprobe] trial micro_batch=" in run.stderr and "[fitprobe] phase: verifying" in run.stderr, \
        "each trial and phase goes to stderr"


def test_an_hf_config_file_is_read_by_the_client_and_sent_inline(server, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_GPT2))
    run = preflight("--server", server.url, "--model", f"hf:{config}", *TINY_GPT2_RUN, "--fresh")
    assert run.returncode == 0, run.stderr
    assert verdict(run).startswith("PASS: 8 = ") and "(verified; " in verdict(run)


def test_an_hf_directory_and_a_server_without_scheme_are_accepted(server, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_GPT2))
    port = server.url.rsplit(":", 1)[1]
    run = preflight("--server", f"localhost:{port}", "--model", f"hf:{tmp_path}", *TINY_GPT2_RUN)
    assert run.returncode == 0, run.stderr
    assert verdict(run).startswith("PASS: ")


@pytest.mark.parametrize(("content", "expected"), [
    (None, "no file"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "holds a JSON list"),
])
def test_a_bad_hf_config_file_exits_2_with_one_line_before_any_request(tmp_path, content, expected):
    config = tmp_path / "config.json"
    if content is not None:
        config.write_text(content)
    # the port is closed: the file must be refused on the client, before the server matters
    run = preflight("--server", f"127.0.0.1:{free_port()}", "--model", f"hf:{config}", *TINY_GPT2_RUN)
    assert run.returncode == 2, run.stderr
    assert run.stdout == "" and len(run.stderr.splitlines()) == 1 and expected in run.stderr, run.stderr


def test_json_is_one_object_on_stdout_for_a_pass(server):
    run = preflight("--server", server.url, *NANO, "--effective-batch", "20", "--json")
    assert run.returncode == 0, run.stderr
    job = json.loads(run.stdout)
    assert job["status"] == "succeeded" and job["verification"]["passed"] and job["plan"]["effective_batch"] == 20
    assert "PASS: " in run.stderr, "with --json the verdict line moves to stderr"


def test_a_target_that_does_not_fit_exits_1_and_json_is_still_one_object(server):
    # nothing fits: even micro-batch 1 is larger than this capacity allows after the weights
    run = preflight("--server", server.url, "--model", "builtin:gpt-small", "--seq-len", "1024",
                    "--capacity", "60000000", "--effective-batch", "8", "--json")
    assert run.returncode == 1, run.stderr
    job = json.loads(run.stdout)
    assert job["status"] == "succeeded" and job["report"]["does_not_fit"]["needs_bytes"] > 60_000_000
    assert "FAIL: does not fit: even micro-batch 1 does not fit" in run.stderr
    assert "[fitprobe] precision bf16-mixed (the default precision" in run.stderr  # no --precision was given
    # each phase once, and each sizing line names the setting it sizes
    sizing = [line for line in run.stderr.splitlines() if line.startswith("[fitprobe] phase: sizing the step")]
    assert len(sizing) == len(set(sizing)) > 2, sizing
    assert all(re.match(r"\[fitprobe\] phase: sizing the step \d+/\d+: ", line) for line in sizing[1:]), sizing


def test_the_spec_options_reach_the_job_the_service_ran(server):
    """--sharding, --collation, --estimate, --lora-* and --seed are ProbeSpec's fields: the stored job has them."""
    run = preflight("--server", server.url, *NANO, "--effective-batch", "8", "--estimate", "--sharding", "fsdp",
                    "--devices", "2", "--collation", "packed", "--seed", "7", "--lora-rank", "4",
                    "--lora-targets", "c_attn, c_proj", "--fresh", "--json")
    job = json.loads(run.stdout)
    spec = job["spec"]
    assert (spec["sharding"], spec["num_devices"], spec["collation"], spec["mode"], spec["seed"]) == (
        "fsdp", 2, "packed", "estimate", 7), spec
    assert spec["lora"] == {"rank": 4, "alpha": 16, "targets": ["c_attn", "c_proj"]}, spec
    # an estimate trains nothing, so its plan is not verified: pre-flight cannot pass it
    assert run.returncode == 1 and job["status"] == "succeeded", run.stderr


@pytest.mark.slow
def test_a_cached_search_with_a_new_effective_batch_verifies_the_new_plan_without_searching_again(server):
    first = preflight("--server", server.url, *NANO, "--effective-batch", "20", "--fresh", "--json")
    assert first.returncode == 0, first.stderr
    searched = json.loads(first.stdout)
    # same probe, a smaller effective batch (inside the limit the cached search reached): a new plan,
    # trained by a job that takes the search from the cache
    cached = preflight("--server", server.url, *NANO, "--effective-batch", "18", "--json")
    assert cached.returncode == 0, cached.stderr
    job = json.loads(cached.stdout)
    assert job["search_cached_from"] == searched["id"] and job["trials"] == [], "no trial ran again"
    assert job["plan"]["effective_batch"] == 18 and job["verification"]["passed"]
    assert "PASS: 18 = " in cached.stderr and f"(search cached from probe {searched['id']}; verified; " in cached.stderr
    assert "[fitprobe] phase: verifying" in cached.stderr


def test_preflight_without_a_model_exits_2_with_one_line_and_submits_nothing(server):
    run = preflight("--server", server.url, "--seq-len", "32", "--effective-batch", "8")
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert len(run.stderr.splitlines()) == 1 and "--model is required" in run.stderr, run.stderr
    with server.client() as client:
        models = [job["model"] for job in client.get("/v1/probes", params={"view": "compact"}).json()["items"]]
    assert "builtin:gpt-tiny" not in models, "nothing is probed by default"


def test_bad_input_exits_2(server):
    run = preflight("--server", server.url, "--model", "builtin:gpt-nano", "--seq-len", "0", "--effective-batch", "8")
    assert run.returncode == 2 and "seq_len" in run.stderr


def test_an_unreachable_server_exits_3_with_one_line_or_one_object():
    port = free_port()
    run = preflight("--server", f"http://127.0.0.1:{port}", *NANO, "--effective-batch", "8")
    assert run.returncode == 3 and verdict(run).startswith("FAIL: ") and "unreachable" in run.stdout
    as_json = preflight("--server", f"127.0.0.1:{port}", *NANO, "--effective-batch", "8", "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["status"] == "not_submitted"



def test_a_probe_still_running_at_the_timeout_exits_3_and_is_left_running(server):
    run = preflight("--server", server.url, "--model", SLOW_JOB["model"], "--seq-len", str(SLOW_JOB["seq_len"]),
                    "--capacity", str(SLOW_JOB["capacity_bytes"]), "--effective-batch", "8", "--fresh",
                    "--timeout", "2s", "--json")
    job = json.loads(run.stdout)
    with FitprobeClient(server.url) as client:
        client.cancel(job["id"])  # free the worker for the other tests
    assert run.returncode == 3, run.stderr
    assert job["status"] in ("queued", "running") and "FAIL: timed out after 2s" in run.stderr
