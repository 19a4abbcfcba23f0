"""How much the fast dispatch cache takes off an estimated trial: its key (probe/estimate/cache_key.py), then
the outputs of its hits too (probe/estimate/fast_outputs.py).

Each row times one trial at micro-batch 1 on a model built once, three ways interleaved in one process (all
read the same cache: the keys are equal): torch's own key and outputs, the fast key, the fast key and fast
outputs; median of --runs each.
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
from fitprobe.probe.estimate import cache_key, fast_outputs
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
        times_s: dict[str, list[float]] = {"torch's own": [], "fast key": [], "fast key and outputs": []}
        for _ in range(args.runs):
            for label in times_s:
                with mock.patch.object(cache_key, "fast_key_matches", return_value=label != "torch's own"), \
                        mock.patch.object(fast_outputs, "fast_outputs_match", return_value=label == "fast key and outputs"):
                    started = time.perf_counter()
                    assert trial(1).fits
                    times_s[label].append(time.perf_counter() - started)
        own, key, both = (statistics.median(times_s[label]) for label in times_s)
        results.append({"row": name, "torch_own_s": round(own, 2), "fast_key_s": round(key, 2),
                        "fast_key_and_outputs_s": round(both, 2), "fast_key_over_torch": round(key / own, 3),
                        "fast_both_over_torch": round(both / own, 3), "runs": times_s})
        print(f"{name}: torch's own {own:.2f} s, fast key {key:.2f} s ({key / own:.2f}), fast key and outputs "
              f"{both:.2f} s ({both / own:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                       "cpus": torch.get_num_threads(), "torch": torch.__version__, "rows": results}, out, indent=1)


if __name__ == "__main__":
    main()
