"""What a what-if table costs, in single estimates: the table's wall time / one `probe --estimate`'s.

    PYTHONPATH=. python bench/whatif_speed.py [--model preset:llama-3.1-8b --gpu rtx4090-24gb]
        [--seq-lens 512,1024,2048,4096] [--repetitions 1] [--json bench/results/whatif-speed-cpu.json]

The table is issue 22's settings grid (full/LoRA/QLoRA × checkpointing off/on × fused/8-bit AdamW, at
bf16-mixed: 12 of the default grid's 36 rows, which add paged 8-bit AdamW and pure bf16) with each row's
longest-sequence column; issue 22's goal is llama-3.1-8b on a 24 GB card at four seq_lens in
at most 3 single estimates. The single estimate is LoRA + checkpointing + fused AdamW at the first
seq_len (a setting that fits, so it is a search and not a "does not fit" answer with its options).
Without --model, a small 8-layer Llama on 24 MiB (the one tests/test_whatif.py deepens), a few minutes.

Where the time goes: a deep decoder's table learns each build's allocation sizes from a few traced
trials, one per optimizer where the build's optimizers learn together, and replays every other trial
(probe/estimate/replay.py); before that, every cell was a search of about four traced trials and every
longest-sequence column a bisection of them. `--no-replay` times that
way too, for the side-by-side ratio. Medians of `--repetitions` runs, interleaved, each in this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fitprobe.probe import whatif
from fitprobe.probe.estimate.fallback import Fallback
from fitprobe.probe.job import run_probe
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.whatif import run_whatif
from fitprobe.probe.whatif_table import settings_grid

SMALL_LLAMA = dict(model_type="llama", vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   tie_word_embeddings=False)
# issue 22's table, which README.md's measurements are of
GOAL_GRID = settings_grid(optimizers=("adamw_torch_fused", "adamw_bnb_8bit"), precisions=("bf16-mixed",))
SINGLE = dict(finetuning="lora", quantization="none", gradient_checkpointing=True, optimizer="adamw_torch_fused")


def timed_s(work) -> float:
    started_s = time.perf_counter()
    work()
    return time.perf_counter() - started_s


def _refuse(cls: type, *args: object) -> NoReturn:
    raise Fallback("timed without replay")


def table_without_replay(base: ProbeSpec, seq_lens: list[int]) -> None:
    """The table as it was made before probe/estimate/replay.py: every trial traced."""
    learn = whatif.Replay.learn
    whatif.Replay.learn = classmethod(_refuse)  # type: ignore[method-assign]
    try:
        run_whatif(base, seq_lens, GOAL_GRID)
    finally:
        whatif.Replay.learn = learn  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="as for probe (default: an 8-layer Llama of a few MiB)")
    parser.add_argument("--gpu", help="a card's name (default with --model: rtx4090-24gb)")
    parser.add_argument("--seq-lens", help="comma-separated (default: 512,1024,2048,4096; 128,256 without --model)")
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--no-replay", action="store_true", help="also time the table with every trial traced")
    parser.add_argument("--json", help="also write the medians and the ratio here, with the host and versions")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.model:
        seq_lens = [int(s) for s in (args.seq_lens or "512,1024,2048,4096").split(",")]
        base = ProbeSpec(model=args.model, seq_len=seq_lens[0], mode="estimate", gpu=args.gpu or "rtx4090-24gb",
                         precision="bf16-mixed")
    else:
        seq_lens = [int(s) for s in (args.seq_lens or "128,256").split(",")]
        base = ProbeSpec(model=SMALL_LLAMA, seq_len=seq_lens[0], mode="estimate", capacity_bytes=24 << 20,
                         precision="bf16-mixed")
    single = base.model_copy(update=SINGLE)
    run_probe(single)  # imports and first-use caches (transformers, bitsandbytes) out of every timing
    singles_s, tables_s, traced_s = [], [], []
    for _ in range(args.repetitions):  # interleaved, so a busy moment on the host costs each alike
        singles_s.append(timed_s(lambda: run_probe(single)))
        tables_s.append(timed_s(lambda: run_whatif(base, seq_lens, GOAL_GRID)))
        if args.no_replay:
            traced_s.append(timed_s(lambda: table_without_replay(base, seq_lens)))
    single_s, table_s = statistics.median(singles_s), statistics.median(tables_s)
    cells = len(GOAL_GRID) * len(seq_lens)
    model = args.model or "8-layer Llama (24 MiB)"
    print(f"table: {model}, {len(GOAL_GRID)} settings × {len(seq_lens)} seq_lens = {cells} cells "
          f"+ {len(GOAL_GRID)} longest")
    print(f"single estimate  median {single_s:.2f}s  runs {[round(s, 2) for s in singles_s]}")
    print(f"what-if table    median {table_s:.2f}s  runs {[round(s, 2) for s in tables_s]}")
    print(f"ratio (table / single estimate): {table_s / single_s:.1f}")
    result = {"date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__,
              "host": f"{platform.machine()} {platform.processor()}, CPU only", "model": model,
              "capacity": base.gpu or base.capacity_bytes, "seq_lens": seq_lens, "repetitions": args.repetitions,
              "single_estimate_s": [round(s, 2) for s in singles_s], "table_s": [round(s, 2) for s in tables_s],
              "ratio": round(table_s / single_s, 2)}
    if traced_s:
        traced = statistics.median(traced_s)
        print(f"every trial traced median {traced:.2f}s  runs {[round(s, 2) for s in traced_s]}  "
              f"ratio {traced / single_s:.1f}")
        result.update(every_trial_traced_s=[round(s, 2) for s in traced_s], every_trial_traced_ratio=round(
            traced / single_s, 2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
