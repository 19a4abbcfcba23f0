"""How long the "does not fit" answer takes next to one estimate that fits (issue 22 §1), side by side.

The row: llama-3.1-8b, seq 2048, bf16-mixed, on a 40 GB card (a100-40gb: the fp32 master weights alone,
30 GiB, fit there; on a 24 GB card the probe refuses the full fine-tune at the door). Full fine-tuning does
not fit, so the probe sizes the step and each setting that would shrink it (checkpointing, LoRA, QLoRA,
8-bit AdamW, all together); LoRA with checkpointing fits, and its estimate (the whole search) is the
yardstick. Goal: at most 2x. Each is a whole `run_probe`, interleaved, median of RUNS.
Run: PYTHONPATH=. python bench/does_not_fit_speed.py [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from fitprobe.probe.job import run_probe
from fitprobe.probe.spec import ProbeSpec

BASE = dict(model="preset:llama-3.1-8b", seq_len=2048, precision="bf16-mixed", mode="estimate", gpu="a100-40gb")


def timed(spec: ProbeSpec) -> tuple[float, dict]:
    started = time.perf_counter()
    report = run_probe(spec)
    return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the raw times here")
    args = parser.parse_args()
    not_fitting = ProbeSpec(**BASE)
    fitting = ProbeSpec(**BASE, finetuning="lora", gradient_checkpointing=True)
    times: dict[str, list[float]] = {"does_not_fit": [], "one_estimate": []}
    for _ in range(args.runs):  # interleaved: a busy moment of the host hits both
        seconds, report = timed(not_fitting)
        assert report.does_not_fit is not None, "the full fine-tune was expected not to fit"
        times["does_not_fit"].append(seconds)
        seconds, report = timed(fitting)
        assert report.search.max_micro_batch >= 1, "LoRA with checkpointing was expected to fit"
        times["one_estimate"].append(seconds)
    dnf, one = statistics.median(times["does_not_fit"]), statistics.median(times["one_estimate"])
    print(f"does not fit (all options): {dnf:7.1f} s   one estimate that fits: {one:7.1f} s   ratio {dnf / one:.2f}x "
          f"(median of {args.runs}; goal <= 2x)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__,
                       "host": f"{platform.machine()} {platform.processor() or ''}, CPU only",
                       "spec": BASE, "seconds": times, "median_ratio": round(dnf / one, 3)}, out, indent=2)


if __name__ == "__main__":
    main()
