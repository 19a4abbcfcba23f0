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
