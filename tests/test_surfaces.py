"""What every answer says about itself: the default precision, each phase once, only the numbers that exist."""

import json
import re

import pytest

from fitprobe.probe.cli import _trial_table, main
from fitprobe.probe.report import TrialResult
from fitprobe.probe.spec import ProbeSpec
from fitprobe.probe.whatif_spec import WhatIfSpec

NANO = ["--model", "builtin:gpt-nano", "--seq-len", "16", "--device", "cpu"]


@pytest.mark.slow  # three trials of a nano model (~18 s on the shared host)
def test_without_precision_every_entry_point_trains_bf16_mixed_and_the_text_says_it_was_the_default(capsys):
    assert main(["trial", *NANO, "--capacity", "64MiB", "--micro-batch", "1"]) == 0
    assert "bf16-mixed (the default precision" in capsys.readouterr().out
    assert main(["trial", *NANO, "--capacity", "64MiB", "--micro-batch", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["precision"] == "bf16-mixed"
    assert main(["trial", *NANO, "--capacity", "64MiB", "--micro-batch", "1", "--precision", "fp32"]) == 0
    assert "default precision" not in capsys.readouterr().out
    # the plan's export, the what-if table and the service's spec read the same default
    assert main(["plan", "--effective-batch", "8", "--max-micro-batch", "4", "--format", "hf"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["bf16"] is True and "precision bf16-mixed is the default" in printed.err
    assert WhatIfSpec(model="builtin:gpt-nano", seq_lens=[16], capacity_bytes="1GiB").precision == "bf16-mixed"
    assert ProbeSpec().precision == "bf16-mixed"


def test_the_client_tables_default_precision_is_the_specs():
    from importlib.resources import files

    table = json.loads(files("fitprobe_client").joinpath("spec_options.json").read_text())
    precision = next(row for row in table["options"] if row["dest"] == "precision")
    assert precision["default"] == ProbeSpec().precision


@pytest.mark.slow  # a does-not-fit estimate sizes five settings (~20 s on the shared host)
def test_a_phase_is_printed_once_and_each_sizing_line_names_its_setting(capsys):
    code = main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--estimate", "--capacity", "1MiB"])
    assert code == 1
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines() if line.startswith("[fitprobe")]
    sizing = [line for line in lines if line.startswith("sizing the step")]
    assert len(sizing) == len(set(sizing)) > 2, sizing
    assert all(re.match(r"sizing the step \d+/\d+: ", line) for line in sizing[1:]), sizing


def test_a_trial_row_shows_only_the_oom_numbers_the_trial_has():
    refused = TrialResult(4, False, oom_live_bytes=None, oom_request_bytes=None)
    stopped = TrialResult(8, False, oom_live_bytes=3 << 20, oom_request_bytes=None)
    table = _trial_table([refused, stopped])
    assert " -," not in table and "allocating -" not in table and "at -" not in table
    assert "OOM at 3.0MiB" in table
    assert refused.describe() == "out of memory" and stopped.describe() == "out of memory at 3.0MiB"


def test_the_readmes_route_table_names_every_route_the_service_serves(tmp_path):
    from pathlib import Path

    from fitprobe.app.config import Settings
    from fitprobe.app.main import create_app

    rows = [line.split(" | ")[0] for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines()
            if re.match(r"\| `(GET|POST|DELETE) /", line)]
    served = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    missing = [f"{method.upper()} {path}" for path, item in served.items() for method in item
               if not any(method.upper() in row and re.search(re.escape(path.replace("{job_id}", "{id}")) + r"[`?,\s]", row)
                          for row in rows)]
    assert not missing, f"routes missing from the README's table: {missing}"


@pytest.mark.slow  # an estimate of a nano model (~7 s on the shared host)
def test_a_token_budgets_plan_is_written_in_tokens(capsys):
    assert main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "16", "--collation", "packed", "--estimate",
                 "--capacity", "64MiB", "--effective-batch-tokens", "128", "--max-micro-batch", "4", "--quiet"]) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: "))
    # 128 tokens = 8 rows of 16; micro-batches of at most 4 rows (64 tokens): two of them, by hand
    assert plan == "plan: 128 tokens = 64 micro × 2 accum × 1 device (rows of 16 tokens)  [exact]"


@pytest.mark.slow  # an estimate of a nano model on the data's worst batch (~8 s on the shared host)
def test_data_text_says_which_rows_are_cut_the_padding_each_collation_wastes_and_what_to_change(tmp_path, capsys):
    lengths = tmp_path / "train.lengths"
    lengths.write_text("10\n" * 90 + "100\n" * 10)  # 90 short rows, 10 longer than seq_len 64
    assert main(["probe", "--model", "builtin:gpt-nano", "--seq-len", "64", "--estimate", "--capacity", "64MiB",
                 "--data", str(lengths), "--max-micro-batch", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "data: train.lengths: 100 rows, 10 to 100 tokens (median 10, p99 100)" in out
    assert "10 rows longer than seq_len 64, cut at 64 tokens" in out
    assert re.search(r"padding wasted at micro-batch 4: padded \d+\.\d%, packed \d+\.\d%, flattened \d+\.\d%", out), out
    # p99 by hand: 90 % of the rows have 10 tokens, so the 99th percentile row has 100
    assert "hint: --seq-len 100 keeps 99% of rows whole; pack instead of pad (--collation packed)" in out
