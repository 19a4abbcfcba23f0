"""`fitprobe probe` and `fitprobe trial` as a user runs them: real processes, exit codes, JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def fitprobe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probe.cli", *args], capture_output=True, text=True, timeout=300)


def test_probe_json_report_has_the_answer_trials_and_context():
    run = fitprobe("probe", "--model", "builtin:gpt-nano", "--seq-len", "64", "--capacity", "24MiB",
                   "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    search = report["search"]
    assert search["max_micro_batch"] >= search["safe_micro_batch"] >= 1
    for trial in search["trials"]:
        assert {"micro_batch", "fits", "peak_allocated_bytes", "peak_reserved_bytes", "step_s"} <= trial.keys()
    assert report["device"]["capacity_bytes"] == 24 * 2**20
    assert report["versions"]["torch"]
    assert report["spec"]["seq_len"] == 64
    assert "trial micro_batch=" in run.stderr, "progress goes to stderr"


def test_probe_prints_a_readable_table():
    run = fitprobe("probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--capacity", "16MiB", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "max micro-batch:" in run.stdout and "safe micro-batch:" in run.stdout


def test_trial_says_whether_a_micro_batch_fits_with_exit_code():
    fits = fitprobe("trial", "--model", "builtin:gpt-nano", "--seq-len", "32", "--capacity", "64MiB",
                    "--device", "cpu", "--micro-batch", "2", "--json")
    assert fits.returncode == 0 and json.loads(fits.stdout)["trial"]["fits"] is True
    too_big = fitprobe("trial", "--model", "builtin:gpt-nano", "--seq-len", "32", "--capacity", "8MiB",
                       "--device", "cpu", "--micro-batch", "512")
    assert too_big.returncode == 1 and "does not fit" in too_big.stdout


@pytest.mark.parametrize("args,fix", [
    (["--model", "builtin:nope"], "choose one of: gpt-nano"),
    (["--model", "preset:gpt5"], "choose one of: gpt2"),
    (["--seq-len", "0"], "seq_len must be between 1 and 131072"),
    (["--capacity", "1MiB"], "smaller than the model's weights"),
    (["--capacity", "lots"], "capacity must look like 600MiB"),
    (["--lora", "--lora-targets", "q_proj"], "pick from"),
    (["--model", "factory:os:system"], "not allow-listed"),
    (["--device", "tpu"], "device must be 'cpu' or 'cuda:N'"),
])
def test_bad_input_ends_with_one_line_saying_what_to_change_and_exit_2(args, fix):
    run = fitprobe("probe", "--device", "cpu", *args)
    assert run.returncode == 2
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("fitprobe: ") and fix in last_line, run.stderr
    assert "Traceback" not in run.stderr
