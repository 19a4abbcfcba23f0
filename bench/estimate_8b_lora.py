"""How long an 8B LoRA estimate takes as a user runs it (issue 34: at most 10 s, median, on an idle 2-core host).

The row: `fitprobe probe --model preset:llama-3.1-8b --lora --seq-len 2048 --gpu h100-80gb --estimate`, each
run a fresh process, as the command line and the service's job processes run it. Two times per run: the
report's own `search.wall_s` (the model built, its cuts traced, the search: what the goal counts) and the
process's wall time (interpreter start and imports too). Medians of RUNS; the raw times go to the JSON.
Run: PYTHONPATH=. python bench/estimate_8b_lora.py [--runs N] [--json bench/results/estimate-8b-lora-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["probe", "--model", "preset:llama-3.1-8b", "--lora", "--seq-len", "2048", "--gpu", "h100-80gb",
           "--estimate", "--json", "--quiet"]
GOAL_S = 10.0


def one_run() -> tuple[float, float, int]:
    """(the report's wall seconds, the process's wall seconds, the max micro-batch) of one fresh estimate."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "fitprobe.probe.cli", *COMMAND], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    process_s = time.perf_counter() - started
    report = json.loads(run.stdout)
    return report["search"]["wall_s"], process_s, report["search"]["max_micro_batch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the raw times and medians here, with the host and versions")
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    report_s, process_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    answers = sorted({r[2] for r in runs})
    assert len(answers) == 1, f"the estimate answered differently across runs: {answers}"
    print(f"8B LoRA estimate: report {report_s:.2f} s, process {process_s:.2f} s (medians of {args.runs}; "
          f"goal: report <= {GOAL_S:.0f} s); max micro-batch {answers[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__,
            "host": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, CPU only",
            "command": ["fitprobe", *COMMAND], "report_wall_s": [r[0] for r in runs],
            "process_wall_s": [r[1] for r in runs], "median_report_wall_s": round(report_s, 3),
            "median_process_wall_s": round(process_s, 3), "goal_report_wall_s": GOAL_S,
            "max_micro_batch": answers[0]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
