"""`fitprobe preflight` as a pipeline runs it: one verdict line, one JSON object, exit codes a CI step can act on."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fitprobe_client.client import FitprobeClient
from tests.api.conftest import SLOW_JOB, free_port

NANO = ("--model", "builtin:gpt-nano", "--seq-len", "32", "--capacity", "16777216")
# a gpt2 small enough to probe and verify in seconds on the CPU device; dropout off because the
# verification compares two cuts of the same examples, and gpt2's default 0.1 dropout draws other masks
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 256, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
TINY_GPT2_RUN = ("--seq-len", "32", "--capacity", "32MiB", "--effective-batch", "8")


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


def test_rerunning_a_gate_that_does_not_fit_gives_the_same_fail_and_exit_1(server):
    """A CI job reruns its gate: the second run is answered from the cached probe and must not turn into bad input."""
    # 1 MB is less than micro-batch 1 of gpt-nano needs
    args = ("--server", server.url, "--model", "builtin:gpt-nano", "--seq-len", "32", "--capacity", "1000000")
    first = preflight(*args, "--effective-batch", "256")
    again = preflight(*args, "--effective-batch", "256")
    other = preflight(*args, "--effective-batch", "64", "--json")
    assert first.returncode == again.returncode == other.returncode == 1, (again.stderr, other.stderr)
    assert verdict(first).startswith("FAIL: does not fit: even micro-batch 1 does not fit"), first.stdout
    assert verdict(again) == verdict(first)
    # why, in the line: the capacity it was measured against and what the step needs
    assert "measured on this service's CPU device: capacity 976.6KiB, the capacity asked; needs " in verdict(first)
    job = json.loads(other.stdout)
    assert job["cached"] and job["plan"] is None and job["report"]["does_not_fit"], job

def test_an_estimate_passes_the_gate_only_when_accepted_and_the_line_says_estimated(server):
    estimate = ("--server", server.url, *NANO, "--estimate", "--effective-batch", "8")
    refused = preflight(*estimate)
    assert refused.returncode == 1, refused.stderr
    assert "estimated, not run on a device; to gate on an estimate, pass --accept-estimate" in verdict(refused)
    accepted = preflight(*estimate, "--accept-estimate")
    assert accepted.returncode == 0, accepted.stderr
    line = verdict(accepted)
    assert line.startswith("PASS (estimated): 8 = ") and "estimated, not run on a device" in line, line
    job = json.loads(preflight(*estimate, "--accept-estimate", "--json").stdout)
    plan, safe = job["plan"], job["report"]["search"]["safe_micro_batch"]
    # the margin kept: the plan's micro-batch leaves the headroom free; and it is even: 8 = accumulation × micro
    assert 1 <= plan["micro_batch"] <= safe and plan["micro_batch"] * plan["accumulation_steps"] == 8
    assert f"micro-batch {plan['micro_batch']} within the safe {safe}, which keeps 10% of 16.0MiB free" in line


def test_an_accepted_estimate_that_keeps_no_headroom_fails(server):
    # 5 MB with 30 % kept free: gpt-nano at seq 32 runs micro-batch 1 at ~4.1 MB, above the 3.5 MB line
    run = preflight("--server", server.url, "--model", "builtin:gpt-nano", "--seq-len", "32", "--capacity", "5000000",
                    "--headroom", "0.3", "--estimate", "--effective-batch", "8", "--accept-estimate")
    assert run.returncode == 1, run.stderr
    line = verdict(run)
    assert line.startswith("FAIL: estimated plan 8 = 8 × 1 ") and "does not keep the 30% headroom" in line, line


@pytest.mark.slow
def test_the_readmes_preflight_example_passes_on_the_default_service(server):
    """The README's example, as written (only the server's address differs): a CPU-only service gates gpt2 for a GPU."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("fitprobe preflight --server localhost:8000"))
    args = shlex.split(command)[2:]
    args[args.index("--server") + 1] = server.url
    run = preflight(*args)
    assert run.returncode == 0, run.stderr
    # by hand: 256 examples, an even split within the safe micro-batch the estimate found
    assert verdict(run).startswith("PASS (estimated): 256 = "), run.stdout

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
