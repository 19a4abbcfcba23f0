"""`fitprobe preflight` as a pipeline runs it: exit codes a CI step can act on."""

from __future__ import annotations

import subprocess
import sys

from tests.api.conftest import free_port


def preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probe.cli", "preflight", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_verified_plan_exits_0_and_prints_it(server):
    run = preflight("--server", server.url, "--model", "builtin:gpt-nano", "--seq-len", "32",
                    "--capacity", "16777216", "--effective-batch", "20")
    assert run.returncode == 0, run.stderr
    assert "= 20 (exact)" in run.stdout and "verification: passed" in run.stdout
    assert "[fitprobe]" in run.stderr, "progress goes to stderr"


def test_a_target_that_cannot_be_met_exits_1(server):
    # nothing fits: even micro-batch 1 is larger than this capacity allows after the weights
    run = preflight("--server", server.url, "--model", "builtin:gpt-small", "--seq-len", "1024",
                    "--capacity", "60000000", "--effective-batch", "8")
    assert run.returncode == 1, run.stderr
    assert "does not fit" in run.stderr


def test_bad_input_exits_2(server):
    run = preflight("--server", server.url, "--seq-len", "0", "--effective-batch", "8")
    assert run.returncode == 2 and "seq_len" in run.stderr


def test_an_unreachable_server_exits_3():
    run = preflight("--server", f"http://127.0.0.1:{free_port()}", "--seq-len", "32", "--effective-batch", "8")
    assert run.returncode == 3 and "unreachable" in run.stderr
