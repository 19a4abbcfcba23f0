"""The what-if table: each cell is the estimate a probe of that setting gives, and the longest-sequence
column is the longest grid point that fits at micro-batch 1 (the next one does not)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import pytest

from fitprobe.probe.make_trial import make_trial
from fitprobe.probe.job import run_probe
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.whatif import run_whatif
from fitprobe.probe.whatif_table import SEQ_GRID, Setting, WhatIf, format_whatif, settings_grid
from fitprobe.probe.whatif_spec import WhatIfSpec
from tests.once_per_run import once_per_run

# 2 layers, hidden 128, vocab 2000: a step of a few MiB, so 24 MiB makes the cells differ by setting
LLAMA = dict(model_type="llama", vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
CAPACITY_BYTES = 24 << 20
SEQ_LENS = [128, 256]
SETTINGS = [Setting("full", False, "adamw_torch_fused"), Setting("qlora", True, "adamw_bnb_8bit")]


def _build_table() -> tuple[ProbeSpec, WhatIf, list[dict]]:
    events: list[dict] = []
    base = ProbeSpec(model=LLAMA, seq_len=128, mode="estimate", capacity_bytes=CAPACITY_BYTES, precision="bf16-mixed")
    return base, run_whatif(base, SEQ_LENS, SETTINGS, events.append), events


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The table three tests read: built once per run, also when xdist gives them to different workers."""
    return once_per_run(tmp_path_factory, "whatif-table", _build_table)


def cell_spec(base: ProbeSpec, setting: Setting, seq_len: int) -> ProbeSpec:
    return base.model_copy(update={**setting.update(), "seq_len": seq_len})


def fits_at_one(spec: ProbeSpec) -> bool:
    _, _, trial = make_trial(spec)
    return trial(1).fits


@pytest.mark.slow  # the table's cells are a few seconds each on a 2-core host
def test_every_cell_is_the_single_estimate_of_its_setting(table):
    base, whatif, _ = table
    answers = set()
    for row in whatif.rows:
        for cell in row.cells:
            search = run_probe(cell_spec(base, row.setting, cell.seq_len)).as_json()["search"]
            assert cell.max_micro_batch == search["max_micro_batch"], (row.label, cell.seq_len)
            assert cell.safe_micro_batch == search["safe_micro_batch"], (row.label, cell.seq_len)
            peak = next((t["peak_allocated_bytes"] for t in search["trials"]
                         if t["fits"] and t["micro_batch"] == search["max_micro_batch"]), None)
            assert cell.peak_bytes == peak, (row.label, cell.seq_len)
            answers.add(cell.max_micro_batch)
    assert len(answers) > 1, "the capacity should make the settings differ"


@pytest.mark.slow
def test_longest_sequence_fits_at_micro_batch_one_and_the_next_grid_point_does_not(table):
    base, whatif, _ = table
    assert whatif.context == 1024
    for row in whatif.rows:
        longest = row.longest
        assert longest.seq_len and longest.seq_len % SEQ_GRID == 0, row.label
        assert fits_at_one(cell_spec(base, row.setting, longest.seq_len)), row.label
        assert longest.next_candidate == longest.seq_len + SEQ_GRID
        assert not fits_at_one(cell_spec(base, row.setting, longest.next_candidate)), row.label
    assert whatif.rows[1].longest.seq_len > whatif.rows[0].longest.seq_len  # QLoRA + checkpointing reach further


@pytest.mark.slow
def test_one_progress_event_per_cell_with_its_max_and_safe_micro_batch(table):
    _, whatif, events = table
    total = len(SETTINGS) * (len(SEQ_LENS) + 1)
    assert [e["done"] for e in events] == list(range(1, total + 1))
    assert {e["type"] for e in events} == {"whatif_cell"} and {e["total"] for e in events} == {total}
    cells = [(e["max_micro_batch"], e["safe_micro_batch"]) for e in events if e["seq_len"] != "longest"]
    assert cells == [(c.max_micro_batch, c.safe_micro_batch) for row in whatif.rows for c in row.cells]


def test_the_default_rows_add_pure_bf16_and_the_paged_optimizer_with_each_builds_optimizers_neighbours():
    rows = settings_grid()
    assert len(rows) == 3 * 2 * 3 * 2
    assert {s.precision for s in rows} == {"bf16-mixed", "bf16"} and "paged_adamw_8bit" in {s.optimizer for s in rows}
    assert "full · ckpt · bf16 · adamw_bnb_8bit" in [s.label for s in rows]  # how an 8B model fits an 80 GB card
    # the rows of one build (all but the optimizer the same) come together: Builds keeps one build at a time
    builds = [(s.finetuning, s.gradient_checkpointing, s.precision) for s in rows]
    assert [b for i, b in enumerate(builds) if i == 0 or builds[i - 1] != b] == list(dict.fromkeys(builds))


def test_a_request_naming_precision_only_still_works_and_the_cell_count_multiplies_in_precisions():
    request = dict(model="builtin:gpt-nano", capacity_bytes="12MiB", seq_lens=[32, 64], finetuning=["full"],
                   checkpointing=["on"], optimizers=["adamw_torch_fused"])
    fp32 = WhatIfSpec(**request, precision="fp32")
    assert [s.precision for s in fp32.settings()] == ["fp32"] and fp32.cell_count == 2
    assert fp32.base().precision == "fp32"
    mixed = WhatIfSpec(**request)  # the default precision brings pure bf16 beside it
    assert [s.precision for s in mixed.settings()] == ["bf16-mixed", "bf16"] and mixed.cell_count == 4
    three = WhatIfSpec(**request, precisions=["fp32", "bf16-mixed", "bf16"])
    assert len(three.settings()) == 3 and three.cell_count == 6
    with pytest.raises(ValueError, match="repeated: bf16"):
        WhatIfSpec(**request, precisions=["bf16", "bf16"])


def test_qlora_on_a_builtin_model_is_not_applicable_rather_than_a_crash():
    base = ProbeSpec(precision="fp32", model="builtin:gpt-nano", seq_len=32, mode="estimate", capacity_bytes=12 << 20)
    whatif = run_whatif(base, [32], [Setting("qlora", False, "adamw_torch_fused")])
    (row,) = whatif.rows
    assert row.cells[0].max_micro_batch is None and "Hugging Face models" in row.cells[0].note
    assert row.longest.seq_len is None and row.longest.note.startswith("not applicable")


# full fine-tuning with checkpointing and the paged 8-bit optimizer, in fp32 master weights and in pure bf16: on 12 MiB
# the two precisions' cells differ, and the safe micro-batch sits below the max
PRECISION_ROWS = settings_grid(["full"], [True], ["paged_adamw_8bit"], ["bf16-mixed", "bf16"])


def _build_precision_table() -> WhatIf:
    base = ProbeSpec(model="builtin:gpt-nano", seq_len=32, mode="estimate", capacity_bytes=12 << 20)
    return run_whatif(base, [32, 64], PRECISION_ROWS, longest_up_to=256)


@pytest.fixture(scope="module")
def precision_table(tmp_path_factory):
    return once_per_run(tmp_path_factory, "whatif-precisions", _build_precision_table)


@functools.cache
def single_estimate(precision: str, seq_len: int) -> dict:
    """What `fitprobe probe --estimate` answers for a precision row's setting, its spec written out in full."""
    spec = ProbeSpec(model="builtin:gpt-nano", seq_len=seq_len, mode="estimate", capacity_bytes=12 << 20,
                     precision=precision, finetuning="full", gradient_checkpointing=True, optimizer="paged_adamw_8bit")
    return run_probe(spec).as_json()["search"]


@pytest.mark.slow  # a table of 2 rows × 2 seq_lens and 4 single estimates: about 10 s on a 2-core host
def test_each_precision_row_answers_what_a_single_estimate_at_that_precision_answers(precision_table):
    assert [row.label for row in precision_table.rows] == ["full · ckpt · bf16-mixed · paged_adamw_8bit",
                                                           "full · ckpt · bf16 · paged_adamw_8bit"]
    for row in precision_table.rows:
        for cell in row.cells:
            search = single_estimate(row.setting.precision, cell.seq_len)
            peak = next(t["peak_allocated_bytes"] for t in search["trials"]
                        if t["fits"] and t["micro_batch"] == search["max_micro_batch"])
            assert (cell.max_micro_batch, cell.safe_micro_batch, cell.peak_bytes) == \
                (search["max_micro_batch"], search["safe_micro_batch"], peak), (row.label, cell.seq_len)
    mixed, pure = precision_table.rows
    # pure bf16 weights (no fp32 master copy) leave room for more examples
    assert all(b.max_micro_batch > m.max_micro_batch for m, b in zip(mixed.cells, pure.cells, strict=True))


@pytest.mark.slow  # reads the table above
def test_the_text_table_shows_each_cells_safe_micro_batch_apart_from_its_max(precision_table):
    search = single_estimate("bf16", 32)
    assert 0 < search["safe_micro_batch"] < search["max_micro_batch"]  # the headroom costs examples here
    text = format_whatif(precision_table)
    assert "each cell: max micro-batch · safe micro-batch" in text.splitlines()[0]
    assert "precision bf16-mixed (the default precision), bf16" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("full · ckpt · bf16 · paged_adamw_8bit"))
    assert f" {search['max_micro_batch']} · safe {search['safe_micro_batch']} (" in row, row


def fitprobe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitprobe.probe.cli", *args], capture_output=True, check=False, text=True,
                          timeout=300)


WHATIF = ["whatif", "--model", "builtin:gpt-nano", "--capacity", "12MiB", "--seq-len", "32,64",
          "--finetuning", "full,qlora", "--checkpointing", "off", "--optimizers", "adamw_torch_fused", "--precisions", "bf16"]


@pytest.mark.slow
def test_cli_prints_the_table_with_progress_per_cell_and_as_json():
    run = fitprobe(*WHATIF)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "seq_len 32" in lines[1] and "seq_len 64" in lines[1] and "longest seq at mb 1" in lines[1]
    full = next(line for line in lines if line.startswith("full · no ckpt · bf16 · adamw_torch_fused"))
    assert re.search(r"\d+ · safe \d+ \([\d.]+MiB\)\s+\d+ · safe \d+ \([\d.]+MiB\)\s+\d+$", full), full
    qlora = next(line for line in lines if line.startswith("qlora"))
    assert qlora.count("n/a [1]") == 3, qlora
    # the reason is said once, below the table and in the progress, and the cells refer to it by number
    assert len([line for line in lines if line.startswith("n/a [1]: ")]) == 1
    assert len([line for line in run.stderr.splitlines() if "n/a [1]: " in line]) == 1
    # one progress line per cell, with the elapsed time: 2 rows × (2 seq_lens + the longest)
    progress = [line for line in run.stderr.splitlines() if "what-if" in line]
    assert len(progress) == 6 and re.match(r"\[fitprobe +[\d.]+s\] what-if 1/6: full · no ckpt · bf16 · "
                                           r"adamw_torch_fused, seq_len 32: max micro-batch \d+, safe \d+", progress[0])

    as_json = fitprobe(*WHATIF, "--json", "--quiet")
    table = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and not as_json.stderr.strip()
    assert table["seq_lens"] == [32, 64] and len(table["rows"]) == 2
    full_row = table["rows"][0]
    assert [[c["max_micro_batch"], c["safe_micro_batch"]] for c in full_row["cells"]] == [
        [int(m), int(s)] for m, s in re.findall(r"(\d+) · safe (\d+) \(", full)]
    assert table["rows"][1]["cells"][0]["max_micro_batch"] is None


def test_sizing_the_step_shows_progress_per_option_on_stderr():
    run = fitprobe("probe", "--model", "builtin:gpt-nano", "--seq-len", "512", "--capacity", "3MiB", "--estimate")
    assert run.returncode == 1 and "does not fit" in run.stdout, run.stdout + run.stderr
    sizing = [line for line in run.stderr.splitlines() if "sizing the step" in line]
    total = int(re.search(r"sizing the step 1/(\d+):", sizing[1]).group(1))
    assert [re.search(r"sizing the step (\d+)/", line).group(1) for line in sizing[1:]] == \
        [str(i) for i in range(1, total + 1)]
    assert "gradient checkpointing" in sizing[1]


# 4 identical layers, the fewest the pattern finder cuts: a probe's estimate runs cuts of 2 and 3 layers and
# extrapolates them (probe/estimate/extrapolate.py)
DEEP_LLAMA = {**LLAMA, "num_hidden_layers": 4, "max_position_embeddings": 512}
# fused AdamW's traces pair up; Adafactor works parameter by parameter, so its estimate falls back to full depth
CUT_SETTINGS = [Setting("full", False, "adamw_torch_fused"), Setting("full", False, "adafactor")]


@pytest.mark.slow
def test_a_deep_decoders_cells_run_the_cuts_a_probe_runs_and_answer_what_it_answers():
    # 1.1 M parameters: 17 MiB of fp32 weights, gradients and AdamW state, so 48 MiB leaves room for a few samples;
    # the longest sequence is searched up to 256, as a service capping its seq_len would
    base = ProbeSpec(model=DEEP_LLAMA, seq_len=128, mode="estimate", capacity_bytes=48 << 20, precision="bf16-mixed")
    whatif = run_whatif(base, [128], CUT_SETTINGS, longest_up_to=256)
    fused, adafactor = whatif.rows
    assert [cell.extrapolated_from_layers for cell in fused.cells] == [[2, 3]]
    assert [cell.extrapolated_from_layers for cell in adafactor.cells] == [None]
    for row in whatif.rows:
        for cell in row.cells:
            report = run_probe(cell_spec(base, row.setting, cell.seq_len)).as_json()
            assert cell.extrapolated_from_layers == report["model"]["extrapolated_from_layers"], row.label
            assert (cell.max_micro_batch, cell.safe_micro_batch) == \
                (report["search"]["max_micro_batch"], report["search"]["safe_micro_batch"]), (row.label, cell.seq_len)
            peak = next(t["peak_allocated_bytes"] for t in report["search"]["trials"]
                        if t["fits"] and t["micro_batch"] == cell.max_micro_batch)
            assert cell.peak_bytes == peak and cell.max_micro_batch >= 1, (row.label, cell.seq_len)
        assert fits_at_one(cell_spec(base, row.setting, row.longest.seq_len)), row.label
    assert ("1 of 2 cells extrapolated from cuts of 2 and 3 layers, as a probe's estimate of them is; "
            "1 ran the full depth") in format_whatif(whatif)


# A process that keeps its log records (pytest's capture, a logging.handlers.MemoryHandler) keeps what a record's
# arguments reference: bitsandbytes logs an exception on import, whose traceback's frames reach every frame that
# was running then. The cells must not depend on it, so the table runs in a fresh process that keeps every record.
KEEPS_LOG_RECORDS = """
import json, logging, sys
from fitprobe.probe.make_trial import make_trial
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.whatif import run_whatif
from tests.test_whatif import CUT_SETTINGS, DEEP_LLAMA, cell_spec

kept = []
class Keep(logging.Handler):
    def emit(self, record):
        kept.append(record)
logging.getLogger().addHandler(Keep())
base = ProbeSpec(model=DEEP_LLAMA, seq_len=128, mode="estimate", capacity_bytes=48 << 20, precision="bf16-mixed")
cell = run_whatif(base, [128], CUT_SETTINGS[:1], longest_up_to=256).rows[0].cells[0]  # the extrapolated row alone
_, _, full_depth = make_trial(cell_spec(base, CUT_SETTINGS[0], 128).model_copy(update={"extrapolate": False}))
json.dump({"cell": [cell.max_micro_batch, cell.peak_bytes, cell.extrapolated_from_layers],
           "full_depth": full_depth(cell.max_micro_batch).peak_allocated_bytes}, sys.stdout)
"""


@pytest.mark.slow  # a one-row table on 4 layers and a full-depth trial, in a fresh process, ~20 s
def test_a_cell_extrapolated_from_cuts_is_the_full_depths_peak_when_the_process_keeps_its_log_records():
    # 4 layers: the fewest the pattern finder cuts (to 2 and 3), where a byte left on the shallow cut counts twice
    run = subprocess.run([sys.executable, "-c", KEEPS_LOG_RECORDS], capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    max_micro_batch, peak_bytes, cut_depths = answer["cell"]
    assert cut_depths == [2, 3] and max_micro_batch >= 1
    assert peak_bytes == answer["full_depth"]
