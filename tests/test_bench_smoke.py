"""The benchmark harness's CPU smoke run: fitprobe against Accelerate and batch-probe, same meter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_records_every_tool_and_fitprobe_finds_the_true_maximum(tmp_path):
    out = tmp_path / "smoke.json"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # one case, the cheaper (its tools took half the LoRA case's time in bench/results/cpu-smoke.json, which has both), and
    # each answer trained for 3 optimizer steps, not 50: on the exact CPU meter the optimizer state exists from the
    # first step on, so every later step repeats the second's peak (the true maximum is found with 2)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_finders.py"), "--cpu-smoke", "--only", "gpt-nano",
                          "--repetitions", "1", "--check-steps", "3", "--out", str(out)], capture_output=True, text=True,
                         timeout=900, cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert not list(workdir.glob(".scale_batch_size_*")), "third-party tuners leave no files where they ran"
    results = json.loads(out.read_text())
    assert results["environment"]["torch"] and results["environment"]["date"]
    assert [case["case"]["name"] for case in results["cases"]] == ["gpt-nano seq64 24MiB"]
    for case in results["cases"]:
        tools = case["tools"]
        assert set(tools) == {"fitprobe", "accelerate", "lightning", "batch-probe"}
        assert tools["fitprobe"]["distance_to_true_max"] == 0, case["case"]["name"]
        assert tools["fitprobe"]["trains_3_steps"] and tools["fitprobe"]["safe_trains_3_steps"]
        # each tool has an answer with its trials, or the error that stopped it, recorded
        assert all(row.get("trials_median", 0) >= 1 or row.get("error") for row in tools.values())
        # fewer trials than the halving and bisecting finders on the same virtual device
        assert tools["fitprobe"]["trials_median"] < min(tools["accelerate"]["trials_median"],
                                                        tools["batch-probe"]["trials_median"])
    assert "| fitprobe |" in run.stdout


BURNING_TESTS = '''
import subprocess, sys, time

def test_burns_in_a_child():
    # the child reports its own CPU time, so the plugin's count has an independent side
    run = subprocess.run([sys.executable, "-c", "import time; sum(range(20_000_000)); print(time.process_time())"],
                         capture_output=True, text=True, check=True)
    open("child-cpu.txt", "w").write(run.stdout)

def test_sleeps():
    time.sleep(0.5)
'''


def test_suite_cpu_gives_a_test_the_cpu_of_the_child_it_ran_and_a_sleeping_test_none(tmp_path):
    (tmp_path / "test_burning.py").write_text(BURNING_TESTS)
    rows_path = tmp_path / "cpu.jsonl"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "bench.suite_cpu", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "test_burning.py"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "FITPROBE_SUITE_CPU": str(rows_path)})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    burning, sleeping = (json.loads(line) for line in rows_path.read_text().splitlines())
    child_cpu_s = float((tmp_path / "child-cpu.txt").read_text())
    assert burning["test"].endswith("test_burns_in_a_child") and child_cpu_s > 0.2
    assert burning["children"] >= child_cpu_s * 0.9 and burning["self"] < burning["children"]
    assert sleeping["wall"] >= 0.5 and sleeping["self"] + sleeping["children"] < 0.2
    summary = subprocess.run([sys.executable, str(ROOT / "bench" / "suite_cpu.py"), str(rows_path)],
                             capture_output=True, text=True, check=True).stdout
    assert "test_burning.py" in summary and summary.startswith("2 tests")
