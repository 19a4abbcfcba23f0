"""The CI gate: submit a probe, follow it, and end with one verdict line and an exit code.

Both `fitprobe preflight` (the full install) and `fitprobe-preflight` (this distribution alone,
httpx only) are this module, so a pipeline gets the same options, lines and exit codes from either.
Nothing here imports torch or the service: the server has made and verified the plan, and sends
the equation a person reads with it.

Exit codes, as every fitprobe command:
  0  the plan is met and verified by training (with --accept-estimate: or estimated within the headroom)
  1  it ran, but the request cannot be met (does not fit, verification failed, plan not verified)
  2  bad input: one line on stderr says what to change (with --json, also a JSON object on stdout)
  3  the service is unreachable, failing, busy, or did not answer in time
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from fitprobe_client.client import (BadRequest, ConfigFileError, FitprobeClient, ServerError, TimedOut,
                                    Unreachable)
from fitprobe_client.phases import PhaseLines, batch_trial_words, trial_outcome
from fitprobe_client.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNMET, EXIT_UNREACHABLE
from fitprobe_client.spec_table import add_spec_options, default_of, missing, spec_body
from fitprobe_client.status import TERMINAL
from fitprobe_client.verdict import plan_words, verdict


def add_options(preflight: argparse.ArgumentParser) -> None:
    """Every option says what it means, its default, and the environment variable it reads, if any.

    The training settings are ProbeSpec's fields, with the help, choices, defaults and bounds the
    library's `probe` command gives them; the rest (where the service is, how long to wait, what
    passes) belong to pre-flight alone.
    """
    preflight.add_argument("--server", required=True,
                           help="the fitprobe service, e.g. localhost:8000 or https://fitprobe.example.com (required)")
    preflight.add_argument("--token", default=os.environ.get("FITPROBE_TOKEN"),
                           help="bearer token, when the service has FITPROBE_API_TOKENS set "
                           "(default: the environment variable FITPROBE_TOKEN; none without it)")
    add_spec_options(preflight)  # ProbeSpec's fields, from the table the library writes (spec_table.py)
    preflight.add_argument("--require-exact", action="store_true",
                           help="fail unless the plan reaches the effective batch exactly (default: off, a nearest "
                           "plan within its stated deviation passes)")
    preflight.add_argument("--accept-estimate", action="store_true",
                           help="pass an estimate (with --estimate: nothing trains) when its plan keeps the headroom: "
                           "micro-batch within the safe micro-batch; the line reads `PASS (estimated): …` "
                           "(default: off, an estimate is never verified and fails)")
    preflight.add_argument("--fresh", action="store_true",
                           help="probe again instead of reusing a cached search, whose new plan is verified anyway "
                           "(default: off)")
    preflight.add_argument("--timeout", default="30m",
                           help="how long to wait for the verdict, e.g. 90s, 30m, 2h; the probe keeps running after "
                           "it (default: 30m)")
    preflight.add_argument("--json", action="store_true",
                           help="print the job as one JSON object on stdout (default: off, one verdict line)")


def parse_duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def run(args: argparse.Namespace) -> int:
    """Submit, follow, and turn the outcome into one line and an exit code a pipeline can act on.

    stdout carries only the verdict line, or with --json exactly one JSON object (the job, whatever
    happened), so a CI step can capture it; progress and, with --json, the verdict go to stderr.
    """
    lacking = missing(args)
    if lacking:
        return _refused(args, lacking)
    try:
        timeout_s = parse_duration_s(args.timeout)
    except ValueError:
        return _refused(args, f"--timeout must look like 30m, 90s or 2h (got {args.timeout!r})")
    # a cached search with a plan nobody trained gets a verification-only job, not a FAIL
    body: dict[str, Any] = {**spec_body(args), "reuse": not args.fresh, "verify_cached": True}
    job: dict[str, Any] | None = None
    with FitprobeClient(args.server, token=args.token) as client:
        try:
            job = client.submit(body)
            source = job.get("search_cached_from")
            _progress(f"probe {job['id']} {job['status']}{' (cached)' if job.get('cached') else ''}"
                      f"{f' (search cached from probe {source}; verifying the plan)' if source else ''}")
            precision = (job.get("spec") or {}).get("precision")
            default = " (the default precision; --precision to change)" if precision == default_of("precision") else ""
            _progress(f"precision {precision}{default}")
            if job["status"] not in TERMINAL:
                job = client.wait(job["id"], timeout_s, on_event=_event_printer())
        except ConfigFileError as exc:
            return _refused(args, str(exc))
        except BadRequest as exc:
            return _refused(args, f"server refused the probe ({exc.status_code}): {exc.detail}")
        except TimedOut as exc:
            return _report(args, EXIT_UNREACHABLE, f"FAIL: timed out after {args.timeout}: {exc}", exc.job)
        except (Unreachable, ServerError) as exc:
            return _report(args, EXIT_UNREACHABLE, f"FAIL: server {client.server} unreachable or failing: {exc}",
                           job or _not_submitted(str(exc)))
    if job.get("plan"):
        _progress(f"plan: {plan_words(job['plan'])}")
    passed, line = verdict(job, args.require_exact, args.accept_estimate)
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


def _event_printer() -> Callable[[dict[str, Any]], None]:
    """Progress on stderr for one job: each phase once, with what it is doing."""
    phase_lines = PhaseLines()

    def print_event(event: dict[str, Any]) -> None:
        if event["type"] == "phase":
            words = phase_lines(event)
            if words:
                _progress(f"phase: {words}")
        elif event["type"] == "trial_started":
            _progress(f"trial micro_batch={event['micro_batch']} ...")
        elif event["type"] == "trial":
            _progress(f"trial micro_batch={event['micro_batch']}: {trial_outcome(event)}")
        elif event["type"] == "batch_trial":
            _progress(batch_trial_words(event))
    return print_event


def main(argv: list[str] | None = None) -> int:
    """`fitprobe-preflight`: the same command as `fitprobe preflight`, for a runner without torch."""
    parser = argparse.ArgumentParser(prog="fitprobe-preflight", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
