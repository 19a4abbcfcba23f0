"""`fitprobe` command line: probe, trial, plan (and serve/preflight/devices, which app/cli.py adds).

Exit codes, the same for every command:
  0  done, and the request is met
  1  it ran, but the request cannot be met (does not fit, verification failed, plan not verified)
  2  bad input: one line on stderr says what to change (with --json, also a JSON object on stdout)
  3  the service is unreachable or did not answer in time (preflight)

The commands import what runs them (the job, the plan, the data reader, the model loader) inside their
own functions: `fitprobe --help`, `plan` and the service's `preflight` never import torch or transformers
(the help and the arithmetic answer without loading a deep-learning stack).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, get_args

from pydantic import ValidationError

from fitprobe_client.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNMET
from fitprobe_client.phases import PhaseLines, batch_trial_words, trial_outcome
from fitprobe.probe.export import FORMATS, export_plan, export_report, provenance_text, render
from fitprobe.probe.breakdown import describe as describe_breakdown
from fitprobe.probe.events import Event
from fitprobe.probe.report import TrialResult
from fitprobe.probe.gpus import GPU_TOTAL_MIB
from fitprobe.probe.models.bounds import ModelLimits
from fitprobe.probe.spec_options import add_spec_options, spec_fields
from fitprobe.probe.spec import (DEFAULT_PRECISION, ESTIMATED, DataLengths, LoraSpec, Optimizer, Precision, ProbeSpec,
                                 SpecError, format_bytes)
from fitprobe.probe.settings import operator_settings
from fitprobe.probe.versions import fitprobe_version

# each CPU rank is a process with its own torch (hundreds of MiB): --devices 1024 would exhaust the host
MAX_CPU_PROCESSES = 16
PRECISIONS = list(get_args(Precision))
WHATIF_PRECISIONS = [p for p in PRECISIONS if p != "fp16-mixed"]  # fp16-mixed's memory is bf16-mixed's


def allowed_factories() -> frozenset[str]:
    """Factories the operator allow-listed: the service's setting (probe/settings.py)."""
    return frozenset(operator_settings().allowed_factories)


def model_limits() -> ModelLimits:
    """The model-size limits the operator set: the service's settings (probe/settings.py)."""
    return operator_settings().model_limits


def checked_spec(args: argparse.Namespace) -> ProbeSpec:
    """The spec, its model's sizes checked by arithmetic before the job builds anything."""
    from fitprobe.probe.models.reference import check_reference

    spec = spec_from_args(args)
    check_reference(spec, allowed_factories(), limits=model_limits())
    return spec


def positive_int(text: str) -> int:
    """argparse type: refuse 0 and negatives before any model is built."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def add_model_options(parser: argparse.ArgumentParser, search: bool = False) -> None:
    """Every setting that changes the step's memory, one option per ProbeSpec field (probe/spec_options.py);
    `search`: with how far to search and what to plan (probe only)."""
    add_spec_options(parser, search, sorted(GPU_TOTAL_MIB))
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def default_device() -> str:
    # torch takes seconds to import: only the commands that run a model ask it
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def spec_from_args(args: argparse.Namespace) -> ProbeSpec:
    if args.gpu and args.mode != "estimate":
        raise SpecError(f"--gpu {args.gpu} plans for a card this machine does not measure: add --estimate "
                        "(or use --capacity to cap the GPU you have)")
    fields = spec_fields(args)
    fields.update(device=args.device or default_device(), data=data_from_args(args))
    return ProbeSpec(**fields)


def data_from_args(args: argparse.Namespace) -> DataLengths | None:
    """`--data PATH` read here, on the user's machine, streaming: the spec carries only rows per length."""
    if not getattr(args, "data", None):
        return None
    from fitprobe.probe.data import data_lengths, read_profile

    progress = progress_of(args)

    def reading(rows: int, done_bytes: int, total_bytes: int) -> None:
        share = f" ({done_bytes / total_bytes:.0%})" if total_bytes else ""
        progress.say(f"reading {args.data}: {rows} rows{share}")

    profile = read_profile(args.data, reading)
    progress.say(f"{args.data}: {profile.rows} rows, longest {profile.max_tokens} tokens, median "
                 f"{profile.quantile(0.5)}")
    return data_lengths(profile, os.path.basename(os.path.normpath(args.data)))


def checked_processes(spec: ProbeSpec, verify: bool) -> ProbeSpec:
    """Refuse a run on the CPU device that would start more processes than the host can hold."""
    processes = spec.device_processes(verify)
    if spec.device == "cpu" and processes > MAX_CPU_PROCESSES:
        raise SpecError(f"--devices must be ≤ {MAX_CPU_PROCESSES} with --device cpu (got {spec.num_devices}): each "
                        "device is a process of its own; lower --devices, or add --estimate")
    return spec


def progress_of(args: argparse.Namespace) -> Progress:
    """The command's one clock: reading --data, the search and the verification count from its start."""
    if not hasattr(args, "progress"):
        args.progress = Progress(getattr(args, "quiet", False))
    return args.progress


def precision_words(precision: str) -> str:
    """The precision an answer used, saying so when it is the default: a forgotten --precision shows."""
    return f"{precision} (the default precision; --precision fp32 for no autocast)" if precision == DEFAULT_PRECISION \
        else precision


class Progress:
    """Long work shows what it is doing on stderr, with elapsed time; stdout stays for the answer."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started_s = time.monotonic()
        self.phase_lines = PhaseLines()
        self.notes: dict[str, int] = {}  # a what-if reason said once, then referred to by its number

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[fitprobe {time.monotonic() - self.started_s:6.1f}s] {text}", file=sys.stderr, flush=True)

    def __call__(self, event: Event) -> None:
        kind = event["type"]
        if kind == "phase":
            words = self.phase_lines(event)
            if words:
                self.say(words)
        elif kind == "whatif_cell":
            self.say(f"what-if {event['done']}/{event['total']}: {event['setting']}, {self._cell_words(event)}")
        elif kind == "trial_started":
            self.say(f"trial micro_batch={event['micro_batch']} ...")
        elif kind == "trial":
            step = f", step {event['step_s']:.2f}s" if event.get("step_s") else ""
            # the breakdown of the peak where the trial has one (probe/breakdown.py), else only the numbers it has
            outcome = (f"fits, {describe_breakdown(event['peak_allocated_bytes'], event['breakdown'])}"
                       if event.get("fits") and event.get("breakdown") and event.get("peak_allocated_bytes")
                       else trial_outcome(event))
            self.say(f"trial micro_batch={event['micro_batch']}: {outcome}{step}")
        elif kind == "batch_trial":
            self.say(batch_trial_words(event))
        elif kind == "verify_step":
            self.say(f"verification step {event['step']} of {event['steps']}")
        elif kind == "recommend_candidate":
            fits = (f"max micro-batch {event['max_micro_batch']}" if event["max_micro_batch"] is not None
                    else f"n/a: {event['note']}")
            self.say(f"candidate {event['done']}/{event['total']}: {event['candidate']}, {fits}")


    def _cell_words(self, event: Event) -> str:
        note = event.get("note")
        if note:
            first = note not in self.notes
            number = self.notes.setdefault(note, len(self.notes) + 1)
            return f"seq_len {event['seq_len']}: n/a [{number}]" + (f": {note}" if first else " (as above)")
        return _cell_words(event)


def _cell_words(event: Event) -> str:
    if event["seq_len"] == "longest":
        return f"longest seq_len at micro-batch 1: {event['longest_seq_len']}"
    if not event["max_micro_batch"]:
        return f"seq_len {event['seq_len']}: does not fit"
    return (f"seq_len {event['seq_len']}: max micro-batch {event['max_micro_batch']}, safe "
            f"{event['safe_micro_batch']}, peak {format_bytes(event['peak_bytes'])} at the max")


def _per_device(spec: ProbeSpec) -> str:
    """A sharded answer is one device's: the text says so wherever it gives a micro-batch or a capacity."""
    return f" per device × {spec.num_devices} devices" if spec.sharding == "fsdp" else ""


def _trial_table(trials: list[TrialResult]) -> str:
    lines = [f"{'micro_batch':>11}  {'fits':>4}  {'peak_allocated':>14}  {'peak_reserved':>13}  {'step_s':>7}"]
    for t in trials:
        step = f"{t.step_s:.3f}" if t.step_s is not None else "-"
        if t.fits:
            memory = f"{format_bytes(t.peak_allocated_bytes):>14}  {format_bytes(t.peak_reserved_bytes):>13}"
        else:
            known = [f"at {format_bytes(t.oom_live_bytes)}" if t.oom_live_bytes is not None else "",
                     f"allocating {format_bytes(t.oom_request_bytes)}" if t.oom_request_bytes is not None else ""]
            memory = " ".join(["OOM", ", ".join(word for word in known if word)]).strip().ljust(29)
        lines.append(f"{t.micro_batch:>11}  {'yes' if t.fits else 'no':>4}  {memory}  {step:>7}")
    largest = max((t for t in trials if t.fits and t.breakdown), key=lambda t: t.micro_batch, default=None)
    if largest is not None and largest.breakdown is not None and largest.peak_allocated_bytes is not None:
        lines.append(f"at micro_batch {largest.micro_batch}: "
                     f"{describe_breakdown(largest.peak_allocated_bytes, largest.breakdown)}")
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    from fitprobe.probe.job import run_job
    from fitprobe.probe.plan import format_plan
    from fitprobe.probe.verify.checks import format_verification

    if args.format and not args.effective_batch:
        raise SpecError("--format exports a plan: give --effective-batch too")
    if args.verify_steps < 2:
        raise SpecError(f"--verify-steps must be at least 2 (got {args.verify_steps}): the loss check compares "
                        "the first and the last step")
    verify = not args.no_verify
    report = run_job(checked_processes(checked_spec(args), verify), progress_of(args), allowed_factories(),
                     args.verify_steps, verify, data_path=args.data)
    verification, not_fitting = report.verification, report.does_not_fit
    # the probe ran, but nothing fits, or the plan it leads to failed when trained for real
    unmet = not_fitting is not None or (verification is not None and not verification.passed)
    code = EXIT_UNMET if unmet else EXIT_OK
    if args.format and not not_fitting:
        print_export(export_report(report, args.format), args)
        return code
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return code
    search, device = report.search, report.device
    each = _per_device(report.spec)
    print(f"{report.spec.model} seq_len={args.seq_len} {precision_words(report.spec.precision)} on {device.name}, "
          f"capacity {format_bytes(device.capacity_bytes)}{each}, headroom {args.headroom:.0%}")
    if report.data:
        from fitprobe.probe.data import data_words

        print("\n".join(data_words(report.data, args.seq_len, report.spec.collation)))
    print(_trial_table(search.trials))
    if not_fitting:
        print(f"does not fit: {not_fitting.message}")
        for option in not_fitting.options:
            print(f"  with {option.change}: needs {format_bytes(option.needs_bytes)} at micro-batch 1"
                  f"{'  (fits)' if option.fits else ''}")
        return code
    limit = " (the limit you set: larger was not tried)" if search.limit_reached else ""
    estimated = f"{ESTIMATED}; " if report.spec.mode == "estimate" else ""
    print(f"max micro-batch:  {search.max_micro_batch}{each}{limit}")
    print(f"safe micro-batch: {search.safe_micro_batch}{each}  ({estimated}{search.trial_count} trials, "
          f"{search.wall_s:.1f}s)")
    shortfall = report.headroom_shortfall
    if shortfall:
        print(f"headroom: {shortfall.message}")
        for option in shortfall.options:
            print(f"  with {option.change}: micro-batch 1 needs {format_bytes(option.needs_bytes)}"
                  f"{'  (keeps the headroom)' if option.fits else ''}")
    if report.plan:
        print(format_plan(report.plan))
    if report.evaluation:
        from fitprobe.probe.evaluate import evaluation_words

        print(evaluation_words(report.evaluation))
    if report.generation:
        from fitprobe.probe.generate import generation_words

        print(generation_words(report.generation))
    if verification:
        print(format_verification(verification))
    elif estimated and report.plan:
        print(f"verification: none, {ESTIMATED} (accuracy: {device.accuracy_note})")
    return code


def print_export(export: dict[str, Any], args: argparse.Namespace) -> None:
    """stdout holds what the user saves and unpacks: the config alone (JSON), or YAML with the provenance
    as comments; --json prints the config and the provenance side by side instead."""
    if args.json:
        print(json.dumps(export, indent=2, ensure_ascii=False))
        return
    print(render(export, args.yaml))
    if not args.yaml:
        print(provenance_text(export), end="", file=sys.stderr)


def cmd_trial(args: argparse.Namespace) -> int:
    from fitprobe.probe.job import run_trial

    report = run_trial(checked_processes(checked_spec(args), verify=False), args.micro_batch, allowed_factories())
    trial = report.trial
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(_trial_table([trial]))
        print(f"micro-batch {trial.micro_batch}{_per_device(report.spec)} "
              f"{'fits' if trial.fits else 'does not fit'} in {format_bytes(report.device.capacity_bytes)}, "
              f"{precision_words(report.spec.precision)}")
    return EXIT_OK if trial.fits else EXIT_UNMET


def cmd_plan(args: argparse.Namespace) -> int:
    from fitprobe.probe.plan import format_plan, make_plan

    plan = make_plan(args.effective_batch, args.max_micro_batch, args.devices,
                     reference_lr=args.reference_lr, reference_batch=args.reference_batch).facts()
    if args.format:
        if args.quantization != "none" and not args.lora:
            raise SpecError(f"--quantization {args.quantization} is QLoRA: add --lora")
        targets = [t.strip() for t in (args.lora_targets or "").split(",") if t.strip()] or None
        measured = {"precision": args.precision, "seq_len": args.seq_len}  # None: the spec's default
        spec = ProbeSpec(gradient_checkpointing=args.grad_checkpointing,
                         finetuning="lora" if args.lora or targets else "full", lora=LoraSpec(targets=targets),
                         quantization=args.quantization,
                         **{name: value for name, value in measured.items() if value is not None})
        export = export_plan(plan, spec, args.format, seq_len_known=args.seq_len is not None,
                             max_micro_batch=args.max_micro_batch)
        if args.precision is None:
            export["provenance"].setdefault("notes", []).insert(0, (
                f"precision {DEFAULT_PRECISION} is the default (no --precision given): if the max micro-batch was "
                "measured in another precision, pass that one"))
        print_export(export, args)
        return EXIT_OK
    # an exact plan always exists (uneven if need be): a request that passes validation is met
    print(json.dumps({"plan": plan.model_dump(mode="json")}, indent=2) if args.json else format_plan(plan))
    return EXIT_OK


def seq_lens(text: str) -> list[int]:
    """argparse type: '1024,2048,4096', each at least 1."""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()]


def _words(text: str, flag: str, allowed: tuple[str, ...]) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in words if w not in allowed]
    if unknown or not words:
        raise SpecError(f"{flag} takes a comma-separated list of {', '.join(allowed)} (got {text!r})")
    return words


def cmd_whatif(args: argparse.Namespace) -> int:
    from fitprobe.probe.models.reference import check_reference
    from fitprobe.probe.whatif import run_whatif
    from fitprobe.probe.whatif_table import default_precisions, format_whatif, settings_grid

    if not args.gpu and not args.capacity:
        raise SpecError("whatif plans for a card: give --gpu CARD or --capacity (e.g. 24GiB)")
    lora: dict[str, Any] = {"rank": args.lora_rank}
    base = ProbeSpec(model=args.model, seq_len=min(args.seq_len), mode="estimate", gpu=args.gpu,
                     capacity_bytes=args.capacity, precision=args.precision, collation=args.collation,
                     lora=lora, headroom=args.headroom)
    check_reference(base, allowed_factories(), limits=model_limits())
    checkpointing = [{"off": False, "on": True}[v]
                     for v in _words(args.checkpointing, "--checkpointing", ("off", "on"))]
    optimizers = _words(args.optimizers, "--optimizers", get_args(Optimizer))
    precisions = (_words(args.precisions, "--precisions", tuple(WHATIF_PRECISIONS)) if args.precisions
                  else default_precisions(args.precision))
    settings = settings_grid(_words(args.finetuning, "--finetuning", ("full", "lora", "qlora")), checkpointing,
                             optimizers, precisions)
    table = run_whatif(base, args.seq_len, settings, progress_of(args), allowed_factories())
    fits = any(cell.max_micro_batch for row in table.rows for cell in row.cells)
    print(json.dumps(table.to_dict(), indent=2) if args.json else format_whatif(table))
    return EXIT_OK if fits else EXIT_UNMET


Command = Callable[[argparse.Namespace], int]


class _Version(argparse.Action):
    """--version names torch's version too, so torch is imported only when it is asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show fitprobe's and torch's versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import torch

        print(f"fitprobe {fitprobe_version()} (torch {torch.__version__})")
        parser.exit()


def build_parser(more_commands: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The library's commands; `more_commands(commands)` adds others (app/cli.py: the service's) with
    `commands.add_parser(...)`, `commands` being argparse's subparsers action (it has no public type).

    probe/ never imports app/: the `fitprobe` command (app/cli.py) builds this parser with its own
    commands added, and `python -m fitprobe.probe.cli` offers the library's alone.
    """
    parser = argparse.ArgumentParser(prog="fitprobe", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=_Formatter)
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("probe", help="find the largest micro-batch that fits, then plan and verify",
                                formatter_class=_Formatter)
    add_model_options(probe, search=True)
    probe.add_argument("--verify-steps", type=int, default=2,
                       help="optimizer steps of the verification run (with --effective-batch; at least 2)")
    probe.add_argument("--no-verify", action="store_true", help="plan the effective batch without training it")
    _add_export_options(probe)
    probe.set_defaults(run=cmd_probe)
    trial = commands.add_parser("trial", help="run one trial at a given micro-batch", formatter_class=_Formatter)
    add_model_options(trial)
    trial.add_argument("--micro-batch", type=positive_int, required=True, help="examples per micro-step")
    trial.set_defaults(run=cmd_trial)
    plan = commands.add_parser("plan", help="split an effective batch into micro-batch × accumulation × devices",
                               formatter_class=_Formatter)
    plan.add_argument("--effective-batch", type=positive_int, required=True, help="target examples per optimizer step")
    plan.add_argument("--max-micro-batch", type=positive_int, required=True,
                      help="largest micro-batch that fits (the probe's safe one)")
    plan.add_argument("--devices", type=positive_int, default=1, help="data-parallel devices")
    plan.add_argument("--reference-lr", type=float, help="a learning rate known to work at --reference-batch")
    plan.add_argument("--reference-batch", type=positive_int, help="the effective batch --reference-lr was tuned for")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--precision", choices=PRECISIONS,  # None: the default, which the export then says it used
                      help=f"with --format: the precision the max micro-batch was measured in (default: "
                      f"{DEFAULT_PRECISION})")
    plan.add_argument("--grad-checkpointing", action="store_true", help="with --format: measured with it")
    plan.add_argument("--lora", action="store_true", help="with --format: measured training LoRA adapters")
    plan.add_argument("--lora-targets", metavar="A,B", help="with --format: the modules the adapters wrap (axolotl "
                      "needs them), e.g. q_proj,k_proj,v_proj,o_proj")
    plan.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"],
                      help="with --format and --lora: the base was measured quantized (QLoRA)")
    plan.add_argument("--seq-len", type=positive_int, help="with --format: the seq_len measured; padded rows are cut there "
                      "(axolotl sequence_len, torchtune max_seq_len, the hf note's max_length)")
    _add_export_options(plan)
    plan.set_defaults(run=cmd_plan)
    whatif = commands.add_parser("whatif", help="which settings (full/LoRA/QLoRA, checkpointing, 8-bit or paged "
                                 "optimizer, bf16-mixed or pure bf16) fit on a card, at which seq_len and max and "
                                 "safe micro-batch (estimated)",
                                 formatter_class=_Formatter)
    whatif.add_argument("--model", required=True, help="as for probe: builtin:, preset:, hf:, factory:")
    whatif.add_argument("--seq-len", type=seq_lens, required=True, help="comma-separated, e.g. 1024,2048,4096")
    whatif.add_argument("--gpu", choices=sorted(GPU_TOTAL_MIB), metavar="CARD",
                        help="plan for this card's capacity; one of " + ", ".join(GPU_TOTAL_MIB))
    whatif.add_argument("--capacity", help="or the memory the step may use, e.g. 24GiB")
    whatif.add_argument("--precision", default=DEFAULT_PRECISION, choices=WHATIF_PRECISIONS,
                        help="training precision (fp16-mixed: estimate bf16-mixed, whose memory is the same); "
                        "without --precisions, the rows take it, and bf16 beside bf16-mixed")
    whatif.add_argument("--collation", default="padded", choices=["padded", "packed"],
                        help="padded: batches hold padding (an attention mask); packed: no padding, no mask")
    whatif.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank of the LoRA and QLoRA rows")
    whatif.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of capacity the safe micro-batch keeps free")
    whatif.add_argument("--finetuning", default="full,lora,qlora",
                        help="rows: full, lora, qlora (LoRA over an nf4 base)")
    whatif.add_argument("--checkpointing", default="off,on", help="rows: gradient checkpointing off, on")
    whatif.add_argument("--optimizers", default="adamw_torch_fused,adamw_bnb_8bit,paged_adamw_8bit",
                        help="rows: these optimizers")
    whatif.add_argument("--precisions", help="rows: these precisions, comma-separated, of "
                        f"{', '.join(WHATIF_PRECISIONS)} (default: --precision, and bf16 beside bf16-mixed)")
    whatif.add_argument("--json", action="store_true", help="print the table as one JSON object")
    whatif.add_argument("--quiet", action="store_true", help="no progress on stderr")
    whatif.set_defaults(run=cmd_whatif)
    from fitprobe.probe.recommend_cli import add_recommend_command

    add_recommend_command(commands, _Formatter, _add_export_options)
    if more_commands is not None:
        more_commands(commands)
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Options show their default where they have one; the exit-code table keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS,
                        help="print the plan as this framework's config instead: the config alone on stdout, "
                        "ready for TrainingArguments(**json.load(f)), its provenance as comments on stderr; with "
                        "--json {format, config, provenance} (see probe/export.py)")
    parser.add_argument("--yaml", action="store_true", help="with --format: YAML, provenance as comments")


def _quiet_third_parties() -> None:
    """transformers/peft warnings are about their own defaults, not the user's request: keep stderr for ours."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "peft", "torch.distributed", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


# the spec's field names (the API's words) as this command line spells them; "model" and "device" are
# also plain words, so they become flags only where pydantic names them as the field in error
FLAGS = {"capacity_bytes": "--capacity", "seq_len": "--seq-len", "num_devices": "--devices",
         "effective_batch": "--effective-batch", "max_micro_batch": "--max-micro-batch", "headroom": "--headroom",
         "gradient_checkpointing": "--grad-checkpointing", "lora.rank": "--lora-rank", "lora.targets": "--lora-targets",
         "precision": "--precision", "optimizer": "--optimizer", "sharding": "--sharding", "collation": "--collation",
         "gpu": "--gpu", "estimate_first": "--estimate-first", "reference_lr": "--reference-lr",
         "reference_batch": "--reference-batch"}
_LOCATIONS = {**FLAGS, "model": "--model", "device": "--device", "request": ""}
_FIELD = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(name) for name in sorted(FLAGS, key=len, reverse=True))
                    + r")(?![\w-])")
_PHRASES = {"set mode to estimate": "add --estimate", "estimate mode": "--estimate",
            "finetuning is lora": "with --lora"}


def _flags(text: str) -> str:
    for phrase, flag in _PHRASES.items():
        text = text.replace(phrase, flag)
    return _FIELD.sub(lambda match: FLAGS[match.group(1)], text)


def cli_message(exc: Exception) -> str:
    """validation_message in the command line's words: flags where the spec names its fields."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return _flags(str(exc))
    parts = []
    for err in errors():
        location = ".".join(str(p) for p in err.get("loc", ())) or "request"
        message = _flags(str(err.get("msg", "")).removeprefix("Value error, "))
        flag = _LOCATIONS.get(location, location)
        if flag and message.startswith(location + " "):  # "device must be …": the field, as a plain word
            message = flag + message[len(location):]
        # "seq_len: seq_len must be …" names the field twice; a model-level check has no field to name
        parts.append(message if not flag or message.startswith(flag) else f"{flag}: {message}")
    return "; ".join(parts)


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command: `parser` is build_parser()'s, or one built with more commands (app/cli.py)."""
    args = (parser or build_parser()).parse_args(argv)
    _quiet_third_parties()
    try:
        return args.run(args)
    except (SpecError, ValidationError) as exc:
        message = cli_message(exc)
        print(f"fitprobe: {message}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": message, "exit_code": EXIT_BAD_INPUT}))
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
