"""How long a small job takes from its start to its result: forked from the fork server against a fresh interpreter.

The job is the tests' FAST_JOB (builtin gpt-nano, seq 32, a probe and its verification on the CPU device). Each
round runs it both ways, side by side: forked by app/executors/forked.py (the fork server started and preloaded
before the round, as the service starts it at start-up), and in a fresh interpreter, as job processes started
before the fork server (`python -c` importing app/worker.py and running `execute`). Medians of ROUNDS; the raw
times go to the JSON. Run: PYTHONPATH=. python bench/job_start.py [--rounds N] [--json bench/results/job-start-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fitprobe.app.executors.forked import start_fork_server, start_job

SPEC = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "capacity_bytes": 16 << 20,
        "effective_batch": 24, "device": "cpu"}
FRESH = ("import sys, json; from fitprobe.app.worker import execute; "
         "execute(json.loads(sys.argv[1]), [], lambda item: print(item[0], flush=True))")


def forked_s() -> float:
    outbox, job_end = multiprocessing.Pipe(duplex=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        process = start_job(dict(SPEC), [], job_end, False, scratch)
        job_end.close()
        while (item := outbox.recv())[0] == "event":
            pass
        elapsed = time.perf_counter() - started
        process.join()
    assert item[0] == "result", item
    return elapsed


def fresh_s() -> float:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FRESH, json.dumps(SPEC)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "result", out.stdout[-500:]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start_fork_server()
    forked_s()  # the fork server's imports: the service pays them at start-up, not in a job
    times: dict[str, list[float]] = {"forked_s": [], "fresh_s": []}
    for _ in range(args.rounds):
        times["forked_s"].append(forked_s())
        times["fresh_s"].append(fresh_s())
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"what": "start-to-result wall time of a gpt-nano probe with verification, one job at a time",
              "median_forked_s": round(medians["forked_s"], 3), "median_fresh_s": round(medians["fresh_s"], 3),
              "fresh_over_forked": round(medians["fresh_s"] / medians["forked_s"], 2),
              "raw": {name: [round(v, 3) for v in values] for name, values in times.items()},
              "rounds": args.rounds, "host": f"{platform.node()} ({os.cpu_count()} cores)",
              "python": platform.python_version(), "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
