"""`fitprobe` command line: probe, trial (and the commands other modules register).

Exit codes: 0 done, 1 the request ran but cannot be met, 2 bad input (one line says what to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from pydantic import ValidationError

from probe.export import FORMATS, export_plan, export_report, render
from probe.gpus import gpu_capacity_bytes
from probe.spec import ProbeSpec, SpecError, format_bytes, validation_message

EXIT_OK, EXIT_UNMET, EXIT_BAD_INPUT = 0, 1, 2


def allowed_factories() -> frozenset[str]:
    """Factories the operator allow-listed; the same variable the service reads."""
    raw = os.environ.get("FITPROBE_ALLOWED_FACTORIES", "")
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin:gpt-tiny",
                        help="builtin:<name>, preset:<name>, hf:<config.json> or factory:pkg.mod:fn")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per example")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--capacity", help="memory the step may use, e.g. 600MiB or 40GiB")
    parser.add_argument("--estimate", action="store_true",
                        help="count bytes under fake tensors instead of running on the device")
    parser.add_argument("--estimate-first", action="store_true",
                        help="estimate first, start the real search at the estimated max, report the estimate's error")
    parser.add_argument("--gpu", help="plan for this card's capacity, e.g. a100-40gb (see probe/gpus.py)")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of capacity kept free")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "fp16-mixed", "bf16"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", help="comma-separated module names to adapt")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--max-micro-batch", type=int, help="never try a micro-batch above this")
    parser.add_argument("--effective-batch", type=int, help="target examples per optimizer step")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    parser.add_argument("--sharding", default="none", choices=["none", "fsdp"],
                        help="fsdp: weights, gradients and optimizer state sharded over --devices (FSDP2, ZeRO-3)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def spec_from_args(args: argparse.Namespace) -> ProbeSpec:
    lora: dict[str, Any] = {"rank": args.lora_rank}
    if args.lora_targets:
        lora["targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    capacity = gpu_capacity_bytes(args.gpu) if args.gpu else args.capacity
    return ProbeSpec(
        model=args.model, seq_len=args.seq_len, device=args.device, capacity_bytes=capacity,
        mode="estimate" if args.estimate else "measure", estimate_first=args.estimate_first,
        headroom=args.headroom, precision=args.precision, optimizer=args.optimizer,
        finetuning="lora" if args.lora else "full", lora=lora,
        gradient_checkpointing=args.grad_checkpointing, max_micro_batch=args.max_micro_batch,
        effective_batch=args.effective_batch, num_devices=args.devices, sharding=args.sharding,
    )


def _progress(event: dict[str, Any]) -> None:
    """Long probes show what they are doing on stderr; stdout stays for the answer."""
    if event["type"] == "phase":
        print(f"[fitprobe] {event['phase']}", file=sys.stderr, flush=True)
    elif event["type"] == "trial":
        verdict = "fits" if event["fits"] else "OOM "
        print(f"[fitprobe] trial micro_batch={event['micro_batch']:>5}: {verdict} "
              f"peak {format_bytes(event['peak_allocated_bytes'])}", file=sys.stderr, flush=True)


def _trial_table(trials: list[dict[str, Any]]) -> str:
    lines = [f"{'micro_batch':>11}  {'fits':>4}  {'peak_allocated':>14}  {'peak_reserved':>13}  {'step_s':>7}"]
    for t in trials:
        step = f"{t['step_s']:.3f}" if t["step_s"] is not None else "-"
        lines.append(f"{t['micro_batch']:>11}  {'yes' if t['fits'] else 'no':>4}  "
                     f"{format_bytes(t['peak_allocated_bytes']):>14}  {format_bytes(t['peak_reserved_bytes']):>13}  "
                     f"{step:>7}")
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    from probe.job import run_job
    from probe.plan import format_plan
    from probe.verify import format_verification

    if args.format and not args.effective_batch:
        raise SpecError("--format exports a plan: give --effective-batch too")
    report = run_job(spec_from_args(args), _progress, allowed_factories(), args.verify_steps, not args.no_verify)
    verification = report["verification"]
    # the probe ran, but the plan it leads to failed when trained for real
    code = EXIT_UNMET if verification is not None and not verification["passed"] else EXIT_OK
    if args.format:
        print(render(export_report(report, args.format), args.format, args.yaml))
        return code
    if args.json:
        print(json.dumps(report, indent=2))
        return code
    search, device = report["search"], report["device"]
    print(f"{report['spec']['model']} seq_len={args.seq_len} on {device['name']}, "
          f"capacity {format_bytes(device['capacity_bytes'])}, headroom {args.headroom:.0%}")
    print(_trial_table(search["trials"]))
    limit = " (the limit you set: larger was not tried)" if search["limit_reached"] else ""
    print(f"max micro-batch:  {search['max_micro_batch']}{limit}")
    print(f"safe micro-batch: {search['safe_micro_batch']}  ({search['trial_count']} trials, {search['wall_s']:.1f}s)")
    if report["plan"]:
        print(format_plan(report["plan"]))
    if verification:
        print(format_verification(verification))
    return code


def cmd_trial(args: argparse.Namespace) -> int:
    from probe.job import run_trial

    report = run_trial(spec_from_args(args), args.micro_batch, allowed_factories())
    trial = report["trial"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_trial_table([trial]))
        print(f"micro-batch {trial['micro_batch']} {'fits' if trial['fits'] else 'does not fit'} "
              f"in {format_bytes(report['device']['capacity_bytes'])}")
    return EXIT_OK if trial["fits"] else EXIT_UNMET


def cmd_plan(args: argparse.Namespace) -> int:
    from probe.plan import format_plan, make_plan

    plan = make_plan(args.effective_batch, args.max_micro_batch, args.devices,
                     reference_lr=args.reference_lr, reference_batch=args.reference_batch).to_dict()
    if args.format:
        spec = {"precision": args.precision, "gradient_checkpointing": args.grad_checkpointing,
                "finetuning": "lora" if args.lora else "full"}
        print(render(export_plan(plan, spec, args.format, max_micro_batch=args.max_micro_batch), args.format, args.yaml))
        return EXIT_OK
    # an exact plan always exists (uneven if need be): a request that passes validation is met
    print(json.dumps({"plan": plan}, indent=2) if args.json else format_plan(plan))
    return EXIT_OK


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitprobe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("probe", help="find the largest micro-batch that fits")
    add_spec_options(probe)
    probe.add_argument("--verify-steps", type=int, default=3,
                       help="optimizer steps of the verification run (with --effective-batch)")
    probe.add_argument("--no-verify", action="store_true", help="plan the effective batch without training it")
    _add_export_options(probe)
    probe.set_defaults(run=cmd_probe)
    trial = commands.add_parser("trial", help="run one trial at a given micro-batch")
    add_spec_options(trial)
    trial.add_argument("--micro-batch", type=int, required=True)
    trial.set_defaults(run=cmd_trial)
    plan = commands.add_parser("plan", help="split an effective batch into micro-batch × accumulation × devices")
    plan.add_argument("--effective-batch", type=int, required=True, help="target examples per optimizer step")
    plan.add_argument("--max-micro-batch", type=int, required=True, help="largest micro-batch that fits (the probe's safe one)")
    plan.add_argument("--devices", type=int, default=1, help="data-parallel devices")
    plan.add_argument("--reference-lr", type=float, help="a learning rate known to work at --reference-batch")
    plan.add_argument("--reference-batch", type=int, help="the effective batch --reference-lr was tuned for")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed", "fp16-mixed", "bf16"],
                      help="with --format: the precision the max micro-batch was measured in")
    plan.add_argument("--grad-checkpointing", action="store_true", help="with --format: measured with it")
    plan.add_argument("--lora", action="store_true", help="with --format: measured training LoRA adapters")
    _add_export_options(plan)
    plan.set_defaults(run=cmd_plan)
    _register_service_commands(commands)
    return parser


def _add_export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS,
                        help="print the plan as this framework's config instead (see probe/export.py)")
    parser.add_argument("--yaml", action="store_true", help="with --format: YAML, provenance as comments")


def _register_service_commands(commands: argparse._SubParsersAction) -> None:
    """serve/preflight/devices live in app/ (web code); a probe-only install still has the rest."""
    try:
        from app.cli import register
    except ImportError:
        return
    register(commands)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (SpecError, ValidationError) as exc:
        print(f"fitprobe: {validation_message(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
