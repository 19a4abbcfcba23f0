"""What a what-if table costs, in single estimates: the table's wall time / one `probe --estimate`'s.

    python bench/whatif_speed.py [--repetitions 3] [--seq-lens 128,256] [--layers 2]

The table is the default settings grid (full/LoRA/QLoRA × checkpointing off/on × fused/8-bit AdamW)
on a small Llama config (the one tests/test_whatif.py uses, so QLoRA applies), plus each row's
longest-sequence column. The single estimate is the first cell's setting probed alone. A ratio near
the cell count means every cell pays for its own model build; reusing one build per row brings it
down to the trials themselves. Medians of `--repetitions` runs, each timed in this process.

`--layers` deepens the Llama: from 4 layers on its estimate runs on two shallow cuts
(probe/extrapolate.py), and so do the table's cells, so the ratio stays near the 2-layer one
however deep the model; a table whose cells ran the full depth would grow with it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fitprobe.probe.job import run_probe
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.whatif import run_whatif, settings_grid

LLAMA = dict(model_type="llama", vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
CAPACITY_BYTES = 24 << 20


def timed_s(work) -> float:
    started_s = time.perf_counter()
    work()
    return time.perf_counter() - started_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seq-lens", default="128,256", help="comma-separated seq_lens of the table")
    parser.add_argument("--layers", type=int, default=LLAMA["num_hidden_layers"],
                        help="the Llama's depth (2: too shallow to cut, as in tests/test_whatif.py)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    llama = {**LLAMA, "num_hidden_layers": args.layers}
    base = ProbeSpec(model=llama, seq_len=seq_lens[0], mode="estimate", capacity_bytes=CAPACITY_BYTES,
                     precision="bf16-mixed")
    settings = settings_grid()
    single = base.model_copy(update=settings[0].update())
    run_probe(single)  # imports and first-use caches (transformers, bitsandbytes) out of both timings
    singles_s, tables_s = [], []
    for _ in range(args.repetitions):  # interleaved, so a busy moment on the host costs both alike
        singles_s.append(timed_s(lambda: run_probe(single)))
        tables_s.append(timed_s(lambda: run_whatif(base, seq_lens, settings)))
    single_s, table_s = statistics.median(singles_s), statistics.median(tables_s)
    cells = len(settings) * len(seq_lens)
    print(f"table: {args.layers}-layer Llama, {len(settings)} settings × {len(seq_lens)} seq_lens = {cells} cells "
          f"+ {len(settings)} longest")
    print(f"single estimate  median {single_s:.2f}s  runs {[round(s, 2) for s in singles_s]}")
    print(f"what-if table    median {table_s:.2f}s  runs {[round(s, 2) for s in tables_s]}")
    print(f"ratio (table / single estimate): {table_s / single_s:.1f}  ({table_s / single_s / cells:.2f} per cell)")


if __name__ == "__main__":
    main()
