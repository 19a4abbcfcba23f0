"""fitprobe's trial peak against the standard Hugging Face loop's, counted independently.

    python bench/loop_parity.py [--micro-batch 4] [--seq-len 64]

For each architecture in tests/reference_loop.py (GPT-2, Llama with grouped-query attention, Qwen2,
Gemma-2 and Mistral with sliding windows, Phi-3), fp32 and bf16-mixed, full and LoRA, padded and
packed: the loop's peak from the test's own byte counter, fitprobe's measured trial peak, and its
estimate (fake tensors). Ratios are fitprobe / loop.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitprobe.probe.job import run_trial
from fitprobe.probe.spec import ProbeSpec
from tests.reference_loop import ARCHITECTURES, LoopSettings, user_loop_peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"{'model':16} {'collation':9} {'precision':10} {'tuning':6} {'fitprobe_bytes':>14} {'loop_bytes':>12} "
          f"{'ratio':>7} {'estimate_ratio':>14}")
    for name, fields in ARCHITECTURES.items():
        for collation in ("padded", "packed"):
            for precision in ("fp32", "bf16-mixed"):
                for lora in (False, True):
                    settings = LoopSettings(precision, lora, collation == "padded", args.micro_batch, args.seq_len)
                    loop = user_loop_peak_bytes(fields, settings)
                    spec = dict(model=fields, seq_len=args.seq_len, precision=precision, collation=collation,
                                finetuning="lora" if lora else "full", capacity_bytes=1 << 32)
                    measured = run_trial(ProbeSpec(**spec), args.micro_batch).trial.peak_allocated_bytes
                    estimated = run_trial(ProbeSpec(mode="estimate", **spec), args.micro_batch).trial
                    print(f"{name:16} {collation:9} {precision:10} {'lora' if lora else 'full':6} {measured:>14,} "
                          f"{loop:>12,} {measured / loop:>7.4f} {estimated.peak_allocated_bytes / loop:>14.4f}",
                          flush=True)


if __name__ == "__main__":
    main()
