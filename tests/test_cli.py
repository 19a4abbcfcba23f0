"""`fitprobe probe` and `fitprobe trial` as a user runs them: exit codes, JSON, text.

What only a fresh process shows (the JSON report with its progress on stderr, third-party warnings kept off
stderr, help that imports no torch) runs as a real process; answers that the parsing, the search or the sizing give
run through `main(argv)` here, since each process start imports torch and transformers again (about 4 s of CPU).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def fitprobe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fitprobe.app.cli", *args], capture_output=True, text=True, timeout=300)


def fitprobe_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """The same command through `main(argv)` in this process, for answers that parsing, validation or one trial
    give: a process start (torch's import) would be most of the test. What `main` quiets for the rest of a
    process (loggers, a variable) is put back, so the test leaves nothing behind."""
    from fitprobe.app.cli import main

    loggers = {name: logging.getLogger(name).level
               for name in ("transformers", "peft", "torch.distributed", "bitsandbytes")}
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    finally:
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        if verbosity is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fitprobe", *args], code, out, err)


def test_probe_json_report_has_the_answer_trials_and_context():
    run = fitprobe("probe", "--model", "builtin:gpt-nano", "--seq-len", "64", "--precision", "fp32", "--capacity", "24MiB",
                   "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    search = report["search"]
    assert search["max_micro_batch"] >= search["safe_micro_batch"] >= 1
    for trial in search["trials"]:
        assert {"micro_batch", "fits", "peak_allocated_bytes", "peak_reserved_bytes", "step_s"} <= trial.keys()
    assert report["device"]["capacity_bytes"] == 24 * 2**20
    assert report["versions"]["torch"]
    assert report["spec"]["seq_len"] == 64
    assert "trial micro_batch=" in run.stderr, "progress goes to stderr"


def test_probe_prints_a_readable_table(capsys):
    run = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                              "--capacity", "16MiB", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "max micro-batch:" in run.stdout and "safe micro-batch:" in run.stdout


def test_trial_says_whether_a_micro_batch_fits_with_exit_code(capsys):
    fits = fitprobe_in_process(capsys, "trial", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                               "--capacity", "64MiB", "--device", "cpu", "--micro-batch", "2", "--json")
    assert fits.returncode == 0 and json.loads(fits.stdout)["trial"]["fits"] is True
    too_big = fitprobe_in_process(capsys, "trial", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                                  "--capacity", "8MiB", "--device", "cpu", "--micro-batch", "512")
    assert too_big.returncode == 1 and "does not fit" in too_big.stdout


@pytest.mark.parametrize("args,fix", [
    (["--model", "builtin:nope"], "choose one of: gpt-nano"),
    (["--model", "preset:gpt5"], "did you mean 'gpt2'"),
    (["--seq-len", "0"], "--seq-len: must be at least 1"),
    (["--seq-len", "200000"], "--seq-len must be between 1 and 131072"),
    (["--model", "builtin:gpt-tiny", "--capacity", "1MiB"], "smaller than the model's weights"),
    (["--capacity", "lots"], "capacity must look like 600MiB"),
    (["--lora", "--lora-targets", "q_proj"], "pick from"),
    (["--model", "factory:os:system"], "not allow-listed"),
    (["--device", "tpu"], "--device must be 'cpu' or 'cuda:N'"),
    (["--estimate"], "--estimate needs a capacity: set --capacity (e.g. 40GiB) or --gpu (a card's name)"),
    (["--estimate", "--gpu", "a100-80gb", "--capacity", "1GiB"], "give --gpu or --capacity, not both"),
    (["--devices", "4", "--effective-batch", "2", "--estimate", "--capacity", "1GiB"],
     "--effective-batch (2) must be at least --devices (4)"),
    (["--sharding", "fsdp", "--devices", "1024"], "--devices must be ≤ 16 with --device cpu (got 1024)"),
    (["--devices", "64", "--effective-batch", "64"], "lower --devices, or add --estimate"),
])
def test_bad_input_ends_with_one_line_saying_what_to_change_and_exit_2(capsys, args, fix):
    command = ("probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--device", "cpu", *args)
    # one case as a real process (the exit code and stderr a shell sees); the others are main(argv)'s answers
    run = fitprobe(*command) if fix == "capacity must look like 600MiB" else fitprobe_in_process(capsys, *command)
    assert run.returncode == 2
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("fitprobe") and fix in last_line, run.stderr
    assert "Traceback" not in run.stderr
    # the command line's own words: its flags, never the API's field names
    assert not re.search(r"\b(capacity_bytes|seq_len|num_devices|effective_batch|max_micro_batch)\b", last_line)



@pytest.mark.parametrize("content,fix", [
    ("not json", "could not be read as JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_config_file_that_is_not_a_json_object_is_one_line_and_exit_2(capsys, tmp_path, content, fix):
    config = tmp_path / "config.json"
    config.write_text(content)
    run = fitprobe_in_process(capsys, "probe", "--model", f"hf:{config}", "--seq-len", "32", "--precision", "fp32",
                              "--device", "cpu")
    assert run.returncode == 2 and fix in run.stderr.strip().splitlines()[-1] and "Traceback" not in run.stderr

@pytest.mark.parametrize("args,fix", [
    ([], "required: --model, --seq-len"),
    (["--model", "builtin:gpt-nano", "--seq-len", "32", "--micro-batch", "0"], "--micro-batch: must be at least 1"),
])
def test_trial_needs_a_model_and_a_positive_micro_batch(capsys, args, fix):
    run = fitprobe_in_process(capsys, "trial", *args)
    assert run.returncode == 2 and fix in run.stderr and "Traceback" not in run.stderr


def test_a_forgotten_model_is_an_error_not_a_silent_default(capsys):
    run = fitprobe_in_process(capsys, "probe", "--seq-len", "32", "--precision", "fp32")
    assert run.returncode == 2 and "--model" in run.stderr


def test_version_and_help_show_defaults_and_the_exit_codes(capsys):
    assert fitprobe_in_process(capsys, "--version").stdout.startswith("fitprobe ")
    top = fitprobe_in_process(capsys, "--help").stdout
    assert "3  the service is unreachable" in top
    probe_help = fitprobe_in_process(capsys, "probe", "--help").stdout
    assert "(default: 0.1)" in probe_help and "h100-80gb" in probe_help


def test_help_and_preflight_never_import_torch():
    # torch takes 9-12 s to import on the CI machine: a pre-flight step must not pay for it
    check = ("import contextlib, io, sys\n"
             "from fitprobe.app.cli import main\n"
             "for argv in (['--help'], ['preflight', '--help']):\n"
             "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "        main(argv)\n"
             "code = main(['preflight', '--server', '127.0.0.1:1', '--model', 'builtin:gpt-nano', '--seq-len', '32', "
             "'--effective-batch', '4'])\n"
             "print(code, sorted(name for name in ('torch', 'fastapi') if name in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines()[-1] == "3 []", run.stdout + run.stderr


def test_gpu_card_without_estimate_does_not_start_a_real_search(capsys):
    run = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                              "--gpu", "h100-80gb")
    assert run.returncode == 2 and "add --estimate" in run.stderr
    assert "trial micro_batch" not in run.stderr


def test_cpu_capacity_beyond_the_hosts_memory_is_refused_before_anything_runs(capsys):
    available_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    run = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-tiny", "--seq-len", "256", "--precision", "fp32",
                              "--device", "cpu", "--capacity", str(available_bytes + (4 << 30)), "--json")
    assert run.returncode == 2 and "--estimate" in run.stderr
    assert json.loads(run.stdout)["exit_code"] == 2, "with --json, stdout still holds one JSON object"


def test_when_nothing_fits_the_report_says_what_the_step_needs_and_what_would_fit(capsys):
    # gpt-tiny at seq-len 64: its full fine-tune needs ~13 MiB at micro-batch 1 (weights, gradients, AdamW states), LoRA
    # ~5 MiB; each option is an estimate of the whole step, so the smaller model answers them in a fraction of the time
    run = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-tiny", "--seq-len", "64", "--precision", "fp32",
                              "--device", "cpu", "--capacity", "8MiB", "--effective-batch", "8", "--json")
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["search"]["max_micro_batch"] == 0 and report["plan"] is None
    failed = report["search"]["trials"][-1]
    assert not failed["fits"] and failed["peak_allocated_bytes"] is None
    assert 0 < failed["oom_live_bytes"] <= 8 * 2**20 < failed["oom_live_bytes"] + failed["oom_request_bytes"]
    needs = report["does_not_fit"]
    # what micro-batch 1 needs, checked by a real trial with room to spare (the CPU meter, not the estimate)
    roomy = fitprobe_in_process(capsys, "trial", "--model", "builtin:gpt-tiny", "--seq-len", "64", "--precision", "fp32",
                                "--device", "cpu", "--capacity", "1GiB", "--micro-batch", "1", "--json")
    measured = json.loads(roomy.stdout)["trial"]["peak_allocated_bytes"]
    assert needs["needs_bytes"] == pytest.approx(measured, rel=0.01)
    assert needs["device_bytes_needed"] >= needs["needs_bytes"] > 8 * 2**20
    lora = next(o for o in needs["options"] if o["settings"] == {"finetuning": "lora"})
    assert lora["fits"] and lora["needs_bytes"] <= 8 * 2**20
    assert "needs" in needs["message"] and "LoRA" in needs["message"]
    assert "(--sharding fsdp --devices N)" in needs["message"], "the hint names the flags that shard"
    # the answer ends with the cheapest combination that keeps full fine-tuning, and a real trial of it fits
    cheapest = needs["cheapest_fitting"]
    assert cheapest is not None and "finetuning" not in cheapest["settings"]
    assert needs["message"].split("; ")[-1].startswith(f"the cheapest change that fits, your method kept: "
                                                       f"{cheapest['change']}, at micro-batch")
    flags = {"gradient_checkpointing": lambda v: ["--grad-checkpointing"] if v else [],
             "optimizer": lambda v: ["--optimizer", v], "precision": lambda v: ["--precision", v]}
    changed = [flag for name, value in cheapest["settings"].items() for flag in flags[name](value)]
    measured_run = fitprobe_in_process(capsys, "trial", "--model", "builtin:gpt-tiny", "--seq-len", "64", "--precision",
                                       "fp32", "--device", "cpu", "--capacity", "8MiB", "--micro-batch", "1", *changed,
                                       "--json")
    assert json.loads(measured_run.stdout)["trial"]["fits"], measured_run.stderr


def test_progress_shows_each_trial_with_elapsed_time_and_quiet_silences_it():
    args = ["probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--device", "cpu", "--capacity",
            "16MiB",
            "--effective-batch", "20", "--verify-steps", "2"]
    run = fitprobe(*args)
    assert run.returncode == 0, run.stderr
    assert "s] trial micro_batch=2 ..." in run.stderr and "verification step 2 of 2" in run.stderr
    assert "Warning" not in run.stderr and "[transformers]" not in run.stderr
    assert fitprobe(*args, "--quiet").stderr == ""


def test_an_estimates_text_says_it_was_not_run_on_a_device_and_how_accurate_it_is(capsys):
    run = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                              "--capacity", "16MiB", "--estimate", "--effective-batch", "8", "--quiet")
    assert run.returncode == 0, run.stderr
    safe_line = next(line for line in run.stdout.splitlines() if line.startswith("safe micro-batch:"))
    assert "estimated, not run on a device" in safe_line
    verification = run.stdout.splitlines()[-1]
    assert verification.startswith("verification: none, estimated, not run on a device (accuracy: fake ")
    assert "not counted:" in verification, "the accuracy note says what the estimate leaves out"


def test_a_plan_that_eats_the_headroom_says_so_and_what_would_restore_it():
    # 4.1 MiB: micro-batches 1 and 2 of gpt-nano fit (3.9 MiB), neither keeps 10% free; the one plan rule
    # (probe/plan.py) then runs micro-batch 1, the step that leaves the most free: 4 = 1 micro × 4 accum, not 2 × 2 at the max
    run = fitprobe("probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32", "--capacity", "4300000",
                   "--estimate",
                   "--effective-batch", "4", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "safe micro-batch: 0" in run.stdout and "plan: 4 = 1 micro × 4 accum × 1 device" in run.stdout
    headroom = next(line for line in run.stdout.splitlines() if line.startswith("headroom:"))
    assert re.search(r"micro-batch 1 fits but leaves only \d\.\d% headroom, under the asked 10%", headroom), headroom
    assert "the headroom comes back with LoRA (--lora)" in headroom
    assert "--sharding fsdp --devices N" in headroom
    assert "  with 8-bit AdamW (--optimizer adamw_bnb_8bit): micro-batch 1 needs" in run.stdout
    assert run.stderr == "", "no third-party warnings for the options it sized"


def test_serve_and_preflight_help_give_every_options_meaning_default_and_variable():
    from fitprobe.app.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("serve", "preflight"):
        for action in commands[name]._actions:
            if action.dest == "help":
                continue
            text = action.help or ""
            assert len(text) > 20 and ("(default: " in text or "(required" in text), (name, action.dest, text)
    serve = " ".join(fitprobe("serve", "--help").stdout.split())  # argparse wraps where it likes
    assert "(default: 8000; env FITPROBE_PORT)" in serve and "(default: 127.0.0.1; env FITPROBE_HOST)" in serve
    # the settings with no option are there too, each with its default
    assert "FITPROBE_MAX_SEQ_LEN largest seq_len a request may ask for (default: 32768)" in serve
    assert "FITPROBE_HUB_ACCESS" in serve and "FITPROBE_API_TOKENS" in serve
    preflight = " ".join(fitprobe("preflight", "--help").stdout.split())
    assert "FITPROBE_TOKEN" in preflight and "(default: 30m)" in preflight and "Exit codes" in preflight


def test_a_sharded_answer_says_it_is_per_device(capsys):
    run = fitprobe_in_process(capsys, "probe", "--model", "builtin:gpt-nano", "--seq-len", "32", "--precision", "fp32",
                              "--sharding", "fsdp", "--devices", "2", "--estimate", "--capacity", "16MiB",
                              "--max-micro-batch", "8", "--quiet")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "capacity 16.0MiB per device × 2 devices" in lines[0] and " fp32 " in lines[0]
    assert next(line for line in lines if line.startswith("max micro-batch:")).startswith(
        "max micro-batch:  8 per device × 2 devices")
    assert next(line for line in lines if line.startswith("safe micro-batch:")).startswith(
        "safe micro-batch: 8 per device × 2 devices")


def test_every_readme_example_states_its_precision():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    commands = [line for line in readme.splitlines()
                if re.match(r"\s*fitprobe (probe|trial|preflight) --", line)]
    requests = re.findall(r"\{\"model\": [^}]*\"seq_len\"[^}]*\}", readme)
    assert len(commands) >= 8 and len(requests) >= 3
    for example in commands + requests:
        assert "precision" in example, f"README example without its precision: {example}"
