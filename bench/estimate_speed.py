"""How much faster an extrapolated estimate is (issue 22 §1), timed side by side, median of 3 runs.

The rows: llama-3.3-70b (80 layers) estimated from two cuts (2 and 3 layers, traced and extrapolated moment
by moment) against the same architecture cut to 2 layers and estimated as is (goal: at most 3x; the
cuts alone are 2.5x); and llama-3.1-8b fully sharded over 8 H100s (FSDP2 on a fake group, seq 4096,
bf16-mixed full fine-tune) against its own 2-layer cut, the goal for FSDP being the same; and the 70B as
QLoRA users run it (nf4 base, paged 8-bit AdamW, checkpointing, for an H100 80GB: issue 34's goal of 3x; paged
optimizers once ran the full depth, 596-716 s). Each is one trial at one micro-batch (the unit a search
repeats), model building included.
Run: PYTHONPATH=. python bench/estimate_speed.py [--only qlora] [--json bench/results/estimate-speed-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from fitprobe.probe.job import make_trial
from fitprobe.probe.models.presets import PRESETS
from fitprobe.probe.spec import ProbeSpec

RUNS = 3
SETTINGS = dict(seq_len=2048, precision="bf16-mixed", finetuning="lora", mode="estimate", capacity_bytes="1EiB")


def preset_config(name: str, **changes: int) -> dict:
    model_type, fields = PRESETS[name]
    return {"model_type": model_type, **fields, **changes}


def timed_s(spec: ProbeSpec, micro_batch: int = 1) -> float:
    """Seconds for what a one-trial estimate costs: building the trial (model, cuts) and running it."""
    times_s = []
    for _ in range(RUNS):
        started = time.perf_counter()
        _, _, trial = make_trial(spec)
        assert trial(micro_batch).fits
        times_s.append(time.perf_counter() - started)
    return statistics.median(times_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the medians and ratios here, with the host and versions")
    parser.add_argument("--only", help="run only the rows whose name contains this (e.g. qlora, fsdp)")
    args = parser.parse_args()
    big, sharded = "llama-3.3-70b", "llama-3.1-8b"
    fsdp = dict(SETTINGS, seq_len=4096, finetuning="full", sharding="fsdp", num_devices=8, capacity_bytes=None,
                gpu="h100-80gb")
    rows = [
        (f"{big} extrapolated", ProbeSpec(model=f"preset:{big}", extrapolate=True, **SETTINGS),
         f"{big} cut to 2 layers", ProbeSpec(model=preset_config(big, num_hidden_layers=2), extrapolate=False,
                                             **SETTINGS)),
        (f"{sharded} fsdp x8 extrapolated", ProbeSpec(model=f"preset:{sharded}", extrapolate=True, **fsdp),
         f"{sharded} fsdp x8 cut to 2 layers", ProbeSpec(model=preset_config(sharded, num_hidden_layers=2),
                                                          extrapolate=False, **fsdp)),
    ]
    qlora = dict(SETTINGS, quantization="nf4", optimizer="paged_adamw_8bit", gradient_checkpointing=True,
                 capacity_bytes=None, gpu="h100-80gb")
    rows.append((f"{big} qlora paged extrapolated", ProbeSpec(model=f"preset:{big}", extrapolate=True, **qlora),
                 f"{big} qlora paged cut to 2 layers",
                 ProbeSpec(model=preset_config(big, num_hidden_layers=2), extrapolate=False, **qlora)))
    rows = [row for row in rows if args.only is None or args.only in row[0]]
    print(f"{'estimate':<34} {'s':>7}   {'against':<34} {'s':>7}  ratio")
    results = []
    for name, spec, other_name, other in rows:
        a_s, b_s = timed_s(spec), timed_s(other)
        print(f"{name:<34} {a_s:7.2f}   {other_name:<34} {b_s:7.2f}  {a_s / b_s:5.2f}x", flush=True)
        results.append({"estimate": name, "median_s": round(a_s, 3), "against": other_name,
                        "against_median_s": round(b_s, 3), "ratio": round(a_s / b_s, 3)})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__,
                       "host": f"{platform.machine()} {platform.processor()}, CPU only", "runs": RUNS,
                       "rows": results}, out, indent=2)


if __name__ == "__main__":
    main()
