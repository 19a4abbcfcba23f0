"""Trials on the user's own data: the worst batch their collation builds, as their collator builds it.

A real tokenized dataset is written by `datasets` (Parquet and JSON Lines) with a skewed length
distribution. Expected values come from the rows the test wrote (their longest, counted by hand) and
from the standard Hugging Face loop fed by transformers' own collators (DataCollatorWithPadding,
DataCollatorWithFlattening), counted by the CPU allocator's own account (torch.profiler memory
events): nothing of probe/step.py or probe/meter.py is on that side.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from fitprobe.probe.data import data_lengths, read_profile
from fitprobe.probe.job import run_probe, run_trial
from fitprobe.probe.spec import ProbeSpec
from tests.test_cli import fitprobe_in_process
from tests.reference_loop import ARCHITECTURES, LoopSettings, allocator_peak_bytes, build_user_model, hf_trainer_optimizer

TOLERANCE = 0.005  # the bar: within 0.5 % of the loop users run
LONGEST = 150
MICRO_BATCH = 4


def _rows(count: int = 400, seed: int = 3) -> list[list[int]]:
    """Chat-like rows: most short, a tail, and one row of LONGEST tokens; ids below every test vocab."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.0, 0.6, count), 2, 90).astype(int)
    lengths[17] = LONGEST
    lengths[200] = 120  # the second longest: a padded batch of the longest rows holds padding
    return [rng.integers(5, 3000, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list[int]], dict[str, Path]]:
    rows = _rows()
    directory = tmp_path_factory.mktemp("user-data")
    table = datasets.Dataset.from_dict({"input_ids": rows})
    table.to_parquet(directory / "train.parquet", batch_size=64)
    table.to_json(directory / "train.jsonl")
    return rows, {"parquet": directory / "train.parquet", "jsonl": directory / "train.jsonl"}


def _spec(path: Path, collation: str, seq_len: int = 256, precision: str = "fp32", **extra) -> ProbeSpec:
    data = data_lengths(read_profile(path), path.name)
    return ProbeSpec(model=ARCHITECTURES["llama-gqa"], seq_len=seq_len, collation=collation, data=data,
                     capacity_bytes=1 << 32, precision=precision, **extra)


def _longest(rows: list[list[int]], count: int) -> list[list[int]]:
    return sorted(rows, key=len, reverse=True)[:count]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_the_worst_padded_batch_is_as_wide_as_the_datas_longest_row(dataset, fmt):
    rows, paths = dataset
    report = run_probe(_spec(paths[fmt], "padded", max_micro_batch=MICRO_BATCH)).as_json()
    data = report["data"]
    assert data["rows"] == len(rows) and data["max_tokens"] == max(len(r) for r in rows) == LONGEST
    assert data["total_tokens"] == sum(len(r) for r in rows)
    assert data["worst_batch"]["shape"] == [MICRO_BATCH, LONGEST]  # not seq_len 256: no batch is wider
    # cut at seq_len: rows longer than it are counted and the batch is seq_len wide
    cut = run_probe(_spec(paths[fmt], "padded", seq_len=128, max_micro_batch=2)).as_json()["data"]
    assert cut["rows_longer_than_seq_len"] == sum(len(r) > 128 for r in rows) == 1
    assert cut["worst_batch"]["shape"] == [2, 128]


def _train(batches: list[dict[str, torch.Tensor]], precision: str, lora: bool) -> None:
    """The standard HF loop on the collator's batches: 2 micro-steps per optimizer step, 2 steps."""
    model = build_user_model(ARCHITECTURES["llama-gqa"], LoopSettings(precision=precision, lora=lora))
    optimizer = hf_trainer_optimizer("adamw_torch_fused", model)
    for _ in range(2):
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = model(**batch).loss / len(batches)
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _padded_batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")), pad_token="<pad>")
    batch = DataCollatorWithPadding(tokenizer, return_tensors="pt")([{"input_ids": r} for r in rows])
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def _flattened_batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    from transformers import DataCollatorWithFlattening

    return dict(DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": r} for r in rows]))


@pytest.mark.parametrize("precision,lora", [("fp32", False), ("bf16-mixed", True)], ids=["fp32-full", "bf16-lora"])
@pytest.mark.parametrize("collation", ["padded", "flattened"])
def test_the_trial_at_the_datas_worst_batch_holds_what_the_hf_collators_loop_holds(dataset, collation, precision, lora):
    rows, paths = dataset
    spec = _spec(paths["parquet"], collation, precision=precision, finetuning="lora" if lora else "full")
    trial = run_trial(spec, MICRO_BATCH).as_json()["trial"]
    assert trial["fits"]
    worst = _longest(rows, MICRO_BATCH)
    collate = _padded_batch if collation == "padded" else _flattened_batch
    batch = collate(worst)
    if collation == "flattened":
        assert batch["input_ids"].shape == (1, sum(len(r) for r in worst))
    else:
        assert batch["input_ids"].shape == (MICRO_BATCH, LONGEST)
    expected = allocator_peak_bytes(lambda: _train([collate(worst), collate(worst)], precision, lora))
    assert trial["peak_allocated_bytes"] == pytest.approx(expected, rel=TOLERANCE)


@pytest.mark.parametrize("collation", ["padded", "flattened"])
def test_an_estimate_of_the_datas_worst_batch_equals_the_measured_trial(dataset, collation):
    _, paths = dataset
    measured = run_trial(_spec(paths["jsonl"], collation, precision="bf16-mixed"), MICRO_BATCH).as_json()["trial"]
    estimated = run_trial(_spec(paths["jsonl"], collation, precision="bf16-mixed", mode="estimate"),
                          MICRO_BATCH).as_json()["trial"]
    assert estimated["peak_allocated_bytes"] == pytest.approx(measured["peak_allocated_bytes"], rel=TOLERANCE)


def test_the_cli_reads_data_with_progress_and_reports_it(capsys, dataset, tmp_path):
    rows, paths = dataset
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ARCHITECTURES["llama-gqa"]))
    done = fitprobe_in_process(capsys, "probe", "--model", f"hf:{config}", "--seq-len", "256", "--precision", "fp32",
                               "--data", str(paths["jsonl"]), "--capacity", "300MiB", "--max-micro-batch", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert f"reading {paths['jsonl']}" in done.stderr and f"{len(rows)} rows, longest {LONGEST} tokens" in done.stderr
    report = json.loads(done.stdout)
    assert report["data"]["source"] == "train.jsonl" and report["data"]["max_tokens"] == LONGEST
    # padding this data wastes, by collation: packed and flattened hold none but packing's last row
    assert report["data"]["padding_fraction"]["flattened"] == 0.0
    assert 0 < report["data"]["padding_fraction"]["padded"] < 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": "oops"}\n')
    refused = fitprobe_in_process(capsys, "probe", "--model", f"hf:{config}", "--seq-len", "256",
                                  "--precision", "fp32", "--data", str(bad))
    assert refused.returncode == 2 and "row 2" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_a_token_budget_is_planned_exactly_and_verified_by_training(capsys):
    done = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-nano", "--seq-len", "32",
                               "--precision", "fp32", "--capacity", "64MiB", "--collation", "packed",
                               "--effective-batch-tokens", "1536", "--max-micro-batch", "16", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    plan, verification = report["plan"], report["verification"]
    # 1536 tokens = 48 rows of 32: by hand, micro-batch × accumulation = 48 with micro-batch ≤ 16
    assert plan["effective_batch"] == 48 and plan["micro_batch"] * plan["accumulation_steps"] == 48
    assert plan["micro_batch"] <= 16 and plan["tokens"]["effective_batch_tokens"] == 1536
    checks = {c["name"]: c["passed"] for c in verification["checks"]}
    assert checks["tokens_per_step"] and verification["passed"], verification["checks"]
    assert verification["input_tokens_per_step"] == 1536  # counted from the tensors the run trained on
    off = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-nano", "--seq-len", "32",
                              "--precision", "fp32", "--collation", "packed", "--effective-batch-tokens", "1000")
    assert off.returncode == 2 and "the nearest are 992 and 1024" in off.stderr


def test_the_exports_carry_packing_and_padding_free_settings():
    from fitprobe.probe.export import export_plan
    from fitprobe.probe.plan import make_plan

    plan = make_plan(48, 16).facts()
    packed = ProbeSpec(collation="packed", seq_len=2048, effective_batch_tokens=48 * 2048)
    hf = export_plan(plan, packed, "hf")
    assert hf["config"]["packing"] is True and hf["config"]["max_length"] == 2048
    assert hf["provenance"]["effective_batch_tokens"] == 48 * 2048
    assert export_plan(plan, packed, "axolotl")["config"]["sample_packing"] is True
    assert export_plan(plan, packed, "torchtune")["config"]["dataset"] == {"packed": True}
    flat = export_plan(plan, ProbeSpec(model="preset:gpt2", collation="flattened", seq_len=2048), "hf")["config"]
    assert flat["padding_free"] is True
    assert "packing" not in export_plan(plan, ProbeSpec(collation="padded", seq_len=2048), "hf")["config"]


def test_the_padding_a_micro_batch_wastes_on_the_data_enters_the_plans_ranking():
    from fitprobe.probe.data import padded_width_ratio
    from fitprobe.probe.plan import ASSUMED_OVERHEAD_FRACTION, make_plan

    # 950 rows of 10 tokens and 50 of 1000: a padded batch of b random rows is 1000 wide unless all b are
    # short (probability 0.95^b), so its expected width is 10 + 990·(1 − 0.95^b) tokens, by hand
    spec = ProbeSpec(precision="fp32", model="builtin:gpt-nano", seq_len=1024, data={"rows_by_length": {10: 950, 1000: 50}})
    width = {b: (10 + 990 * (1 - 0.95**b)) / 1000 for b in (1, 2, 4, 8, 16, 32, 64)}
    ratio = padded_width_ratio(spec)
    assert all(ratio(b) == pytest.approx(w, rel=1e-9) for b, w in width.items())
    # no timings on this host: a micro-step costs a fixed share plus its rows' tokens
    fixed = ASSUMED_OVERHEAD_FRACTION
    step = {b: 64 // b * (fixed + (1 - fixed) * b / 64 * width[b]) for b in width}
    assert step[16] < step[32] < step[64]  # one micro-batch of 64 pads every step to 1000 tokens
    assert step[32] <= min(step.values()) * 1.05  # within the planner's 5 % noise band, with fewer micro-steps
    without_data = make_plan(64, 64).facts().as_json()
    with_data = make_plan(64, 64, width=ratio).facts().as_json()
    assert without_data["micro_batch"] == 64 and with_data["micro_batch"] == 32
    slower = next(a for a in with_data["alternatives"] if a["micro_batch"] == 64)
    assert slower["relative_throughput"] == pytest.approx(step[32] / step[64], abs=1e-3)


def test_the_verification_trains_on_the_users_rows(capsys, dataset, tmp_path):
    rows, paths = dataset
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ARCHITECTURES["llama-gqa"]))
    done = fitprobe_in_process(capsys, "probe", "--model", f"hf:{config}", "--seq-len", "64", "--precision", "fp32",
                               "--data", str(paths["parquet"]), "--capacity", "300MiB", "--effective-batch", "20",
                               "--max-micro-batch", "5", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    verification = json.loads(done.stdout)["verification"]
    assert verification["passed"], verification["checks"]
    assert verification["batches"] == "the data's first 20 rows"
    # the targets of the file's first 20 rows, cut at seq_len 64, counted by hand: the step trained on them
    expected_targets = sum(min(len(r), 64) - 1 for r in rows[:20])
    assert verification["tokens_per_s"] * verification["step_s"] == pytest.approx(expected_targets)
    assert verification["micro_batch"] == 5  # two batch sizes, 5 and 20: the noise scale is measured on the rows
    # after 2 steps it is a value, or the measurement's own verdict that noise dominates: both come from these rows
    assert "no two batch sizes" not in verification["gradient_noise_note"]


def test_an_extrapolated_estimate_of_flattened_batches_equals_the_full_depth():
    """Flattened batches take the packed-sequence mask path: the depth extrapolation must hold there too."""
    config = dict(model_type="llama", vocab_size=4000, hidden_size=128, intermediate_size=344, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    reports = [run_trial(ProbeSpec(model=config, seq_len=128, collation="flattened", capacity_bytes=1 << 32,
                                   mode="estimate", precision="bf16-mixed", extrapolate=extrapolate,
                                   data={"rows_by_length": {30: 10, 100: 3}}), 4).as_json()
               for extrapolate in (True, False)]
    assert reports[0]["model"]["extrapolated_from_layers"] == [2, 3]
    assert reports[0]["trial"]["phase_peak_bytes"] == reports[1]["trial"]["phase_peak_bytes"]
