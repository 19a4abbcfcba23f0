"""How much the fast dispatch-cache key (probe/estimate/cache_key.py) takes off an estimated trial.

Each row times one trial at micro-batch 1 on a model built once, with the fast key and with torch's own,
interleaved in one process (both read the same cache: the keys are equal), median of --runs each.
Run: PYTHONPATH=. python bench/cache_key_speed.py [--runs 5] [--json bench/results/cache-key-speed-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from unittest import mock

import torch

from bench.estimate_speed import preset_config
from fitprobe.probe.estimate import cache_key
from fitprobe.probe.job import make_trial
from fitprobe.probe.spec import ProbeSpec

ESTIMATE = dict(seq_len=2048, precision="bf16-mixed", mode="estimate", capacity_bytes="1EiB")


ROWS = {
    "llama-3.1-8b LoRA, extrapolated (2 cuts)": ProbeSpec(model="preset:llama-3.1-8b", finetuning="lora", **ESTIMATE),
    "llama-3.1-8b LoRA + checkpointing, 4 layers": ProbeSpec(model=preset_config("llama-3.1-8b", num_hidden_layers=4),
                                                            finetuning="lora", gradient_checkpointing=True,
                                                            extrapolate=False, **ESTIMATE),
    "qwen2.5-7b full fine-tune, 4 layers": ProbeSpec(model=preset_config("qwen2.5-7b", num_hidden_layers=4),
                                                    extrapolate=False, **ESTIMATE),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the medians and ratios here, with the host and versions")
    args = parser.parse_args()
    results = []
    for name, spec in ROWS.items():
        _, _, trial = make_trial(spec)
        trial(1)  # warm: the cache's misses, imports
        times_s: dict[str, list[float]] = {"fast key": [], "torch's key": []}
        for _ in range(args.runs):
            for label in times_s:
                with mock.patch.object(cache_key, "fast_key_matches", return_value=label == "fast key"):
                    started = time.perf_counter()
                    assert trial(1).fits
                    times_s[label].append(time.perf_counter() - started)
        fast, own = (statistics.median(times_s[label]) for label in times_s)
        results.append({"row": name, "fast_key_s": round(fast, 2), "torch_key_s": round(own, 2),
                        "fast_over_torch": round(fast / own, 3), "runs": times_s})
        print(f"{name}: fast key {fast:.2f} s, torch's key {own:.2f} s, ratio {fast / own:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                       "cpus": torch.get_num_threads(), "torch": torch.__version__, "rows": results}, out, indent=1)


if __name__ == "__main__":
    main()
