"""Service commands of `fitprobe`: serve, preflight, devices. Imported only when these run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK, EXIT_UNMET, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import Settings
    from app.main import create_app

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "data_dir": args.data_dir}.items() if v}
    settings = Settings(**overrides)
    settings.check_bind()
    app = create_app(settings)

    class Server(uvicorn.Server):
        """Tells the app the moment a stop begins: uvicorn then waits for open connections, and only
        after them runs the lifespan's shutdown, too late for the event streams that hold them open."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.event_streams.close()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          timeout_graceful_shutdown=settings.shutdown_grace_s,
                          access_log=settings.access_log)).run()
    return EXIT_OK


def parse_duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def cmd_preflight(args: argparse.Namespace) -> int:
    """Submit, follow, and turn the outcome into one line and an exit code a pipeline can act on.

    stdout carries only the verdict line, or with --json exactly one JSON object (the job, whatever
    happened), so a CI step can capture it; progress and, with --json, the verdict go to stderr.
    """
    from app.client import (BadRequest, ConfigFileError, FitprobeClient, ServerError, TimedOut,
                            Unreachable)

    if not args.model:
        return _refused(args, "--model is required: name the model the training run uses (builtin:<name>, "
                              "preset:<name>, hf:./config.json or hf:org/name); pre-flight never picks one")
    try:
        timeout_s = parse_duration_s(args.timeout)
    except ValueError:
        return _refused(args, f"--timeout must look like 30m, 90s or 2h (got {args.timeout!r})")
    # verify_cached: a cached search with a plan nobody trained gets a verification-only job, not a FAIL
    body: dict[str, Any] = {"model": args.model, "seq_len": args.seq_len, "effective_batch": args.effective_batch,
                            "num_devices": args.devices, "precision": args.precision, "optimizer": args.optimizer,
                            "finetuning": "lora" if args.lora else "full",
                            "gradient_checkpointing": args.grad_checkpointing, "reuse": not args.fresh,
                            "verify_cached": True}
    if args.capacity:
        body["capacity_bytes"] = args.capacity
    job: dict[str, Any] | None = None
    with FitprobeClient(args.server, token=args.token) as client:
        try:
            job = client.submit(body)
            source = job.get("search_cached_from")
            _progress(f"probe {job['id']} {job['status']}{' (cached)' if job.get('cached') else ''}"
                      f"{f' (search cached from probe {source}; verifying the plan)' if source else ''}")
            if job["status"] not in ("succeeded", "failed", "cancelled"):
                job = client.wait(job["id"], timeout_s, on_event=_print_event)
        except ConfigFileError as exc:
            return _refused(args, str(exc))
        except BadRequest as exc:
            return _refused(args, f"server refused the probe ({exc.status_code}): {exc.detail}")
        except TimedOut as exc:
            return _report(args, EXIT_UNREACHABLE, f"FAIL: timed out after {args.timeout}: {exc}", exc.job)
        except (Unreachable, ServerError) as exc:
            return _report(args, EXIT_UNREACHABLE, f"FAIL: server {client.server} unreachable or failing: {exc}",
                           job or _not_submitted(str(exc)))
    from app.verdict import verdict
    from probe.plan import plan_equation

    if job.get("plan"):
        _progress(f"plan: {plan_equation(job['plan'])}")
    passed, line = verdict(job, args.require_exact)
    return _report(args, EXIT_OK if passed else EXIT_UNMET, line, job)


def _report(args: argparse.Namespace, code: int, line: str, job: dict[str, Any] | None) -> int:
    """The run's last words: the verdict on stdout, or the one JSON object there and the verdict on stderr."""
    if args.json:
        print(json.dumps(job))
    print(line, file=sys.stderr if args.json else sys.stdout)
    return code


def _not_submitted(error: str) -> dict[str, Any]:
    """--json's one object when there is no job to print: the keys a job's status and error use."""
    return {"id": None, "status": "not_submitted", "error": error}


def _refused(args: argparse.Namespace, message: str) -> int:
    """Bad input: one line on stderr that says what to change, as every fitprobe command does."""
    if args.json:
        print(json.dumps(_not_submitted(message)))
    print(f"fitprobe: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _progress(message: str) -> None:
    print(f"[fitprobe] {message}", file=sys.stderr, flush=True)


def _print_event(event: dict[str, Any]) -> None:
    from probe.spec import format_bytes

    if event["type"] == "phase":
        _progress(f"phase: {event['phase']}")
    elif event["type"] == "trial_started":
        _progress(f"trial micro_batch={event['micro_batch']} ...")
    elif event["type"] == "trial":
        outcome = (f"fits, peak {format_bytes(event.get('peak_allocated_bytes'))}" if event.get("fits") else
                   f"out of memory at {format_bytes(event.get('oom_live_bytes'))} while allocating "
                   f"{format_bytes(event.get('oom_request_bytes'))}")
        _progress(f"trial micro_batch={event['micro_batch']}: {outcome}")


def cmd_devices(args: argparse.Namespace) -> int:
    from probe.devices import list_devices

    capacity = int(os.environ.get("FITPROBE_CPU_CAPACITY_BYTES", 1 << 30))
    print(json.dumps({"devices": list_devices(capacity)}, indent=2))
    return EXIT_OK


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the HTTP service (embedded SQLite, local workers)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir")
    serve.set_defaults(run=cmd_serve)

    preflight = commands.add_parser("preflight", help="CI gate: exit 0 only when the plan is verified")
    preflight.add_argument("--server", required=True, help="e.g. localhost:8000 or https://fitprobe.example.com")
    preflight.add_argument("--token", default=os.environ.get("FITPROBE_TOKEN"))
    preflight.add_argument("--model", help="required: builtin:<name>, preset:<name>, hf:<config.json or its "
                           "directory> (read here, sent inline), hf:org/name[@revision]")
    preflight.add_argument("--seq-len", type=int, required=True)
    preflight.add_argument("--effective-batch", type=int, required=True)
    preflight.add_argument("--devices", type=int, default=1)
    preflight.add_argument("--capacity")
    preflight.add_argument("--precision", default="fp32")
    preflight.add_argument("--optimizer", default="adamw_torch_fused",
                           help="as your framework names it (HF TrainingArguments.optim); see `fitprobe probe --help`")
    preflight.add_argument("--lora", action="store_true")
    preflight.add_argument("--grad-checkpointing", action="store_true")
    preflight.add_argument("--require-exact", action="store_true")
    preflight.add_argument("--fresh", action="store_true",
                           help="probe again instead of reusing a cached search (whose new plan is verified anyway)")
    preflight.add_argument("--timeout", default="30m")
    preflight.add_argument("--json", action="store_true", help="print the job as one JSON object on stdout")
    preflight.set_defaults(run=cmd_preflight)

    devices = commands.add_parser("devices", help="list devices (NVML, or the CPU device)")
    devices.set_defaults(run=cmd_devices)
