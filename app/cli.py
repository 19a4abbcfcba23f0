"""Service commands of `fitprobe`: serve, preflight, devices. Imported only when these run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
                          timeout_graceful_shutdown=settings.shutdown_grace_s)).run()
    return EXIT_OK


def parse_duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def cmd_preflight(args: argparse.Namespace) -> int:
    """Submit, follow, and turn the outcome into an exit code a pipeline can act on."""
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    body: dict[str, Any] = {"model": args.model, "seq_len": args.seq_len, "effective_batch": args.effective_batch,
                            "num_devices": args.devices, "precision": args.precision, "optimizer": args.optimizer,
                            "finetuning": "lora" if args.lora else "full",
                            "gradient_checkpointing": args.grad_checkpointing}
    if args.capacity:
        body["capacity_bytes"] = args.capacity
    try:
        deadline_s = time.monotonic() + parse_duration_s(args.timeout)
    except ValueError:
        print(f"fitprobe: --timeout must look like 30m, 90s or 2h (got {args.timeout!r})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with httpx.Client(base_url=args.server, headers=headers, timeout=30) as client:
            response = client.post("/v1/probes", json=body)
            if response.status_code in (401, 422):
                print(f"fitprobe: {response.json().get('detail')}", file=sys.stderr)
                return EXIT_BAD_INPUT
            response.raise_for_status()
            job = response.json()
            seen_trials = 0
            while job["status"] in ("queued", "running"):
                if time.monotonic() > deadline_s:
                    print(f"fitprobe: timed out after {args.timeout} waiting for probe {job['id']}", file=sys.stderr)
                    return EXIT_UNREACHABLE
                time.sleep(1.0)
                job = client.get(f"/v1/probes/{job['id']}").raise_for_status().json()
                for trial in job["trials"][seen_trials:]:
                    print(f"[fitprobe] trial micro_batch={trial['micro_batch']}: "
                          f"{'fits' if trial['fits'] else 'OOM'}", file=sys.stderr)
                seen_trials = len(job["trials"])
                print(f"[fitprobe] {job['status']}: {job['phase']}", file=sys.stderr)
    except httpx.HTTPError as exc:
        print(f"fitprobe: server {args.server} unreachable or failing: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return _verdict(job, args)


def _verdict(job: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(job, indent=2))
    if job["status"] != "succeeded":
        print(f"fitprobe: probe {job['status']}: {job.get('error')}", file=sys.stderr)
        return EXIT_UNMET
    plan, verification = job["plan"], job["verification"]
    if not args.json:
        print(f"plan: {plan['micro_batch']} × {plan['accumulation_steps']} × {plan['num_devices']} = "
              f"{plan['effective_batch']} ({'exact' if plan['exact'] else 'not exact'})")
        print(f"verification: {'passed' if verification and verification['passed'] else 'not passed'}")
    if args.require_exact and not plan["exact"]:
        return EXIT_UNMET
    return EXIT_OK if verification and verification["passed"] else EXIT_UNMET


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
    preflight.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    preflight.add_argument("--token", default=os.environ.get("FITPROBE_TOKEN"))
    preflight.add_argument("--model", default="builtin:gpt-tiny")
    preflight.add_argument("--seq-len", type=int, required=True)
    preflight.add_argument("--effective-batch", type=int, required=True)
    preflight.add_argument("--devices", type=int, default=1)
    preflight.add_argument("--capacity")
    preflight.add_argument("--precision", default="fp32")
    preflight.add_argument("--optimizer", default="adamw")
    preflight.add_argument("--lora", action="store_true")
    preflight.add_argument("--grad-checkpointing", action="store_true")
    preflight.add_argument("--require-exact", action="store_true")
    preflight.add_argument("--timeout", default="30m")
    preflight.add_argument("--json", action="store_true")
    preflight.set_defaults(run=cmd_preflight)

    devices = commands.add_parser("devices", help="list devices (NVML, or the CPU device)")
    devices.set_defaults(run=cmd_devices)
