"""The `fitprobe` command: the library's commands (probe/cli.py) and the service's: serve, preflight, devices.

It sits above both, as the console script's entry (`fitprobe = "fitprobe.app.cli:main"`): probe/ never
imports app/, so the library's command line takes these commands from here, not the other way.
Nothing heavy is imported before a command runs: `--help` and `preflight` stay free of torch and
FastAPI (each command imports what it needs).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# preflight is the torch-free client's own command (client/), so `fitprobe-preflight` behaves the same
from fitprobe_client.exit_codes import EXIT_OK
from fitprobe_client.preflight import __doc__ as preflight_doc
from fitprobe_client.preflight import add_options as add_preflight_options
from fitprobe_client.preflight import run as cmd_preflight
from fitprobe.probe import cli as probe_cli


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fitprobe.app.config import Settings
    from fitprobe.app.http_protocol import MAX_HEAD_BYTES, protocol
    from fitprobe.app.main import create_app

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
                          # uvicorn annotates int, but only waits on it with asyncio (which takes seconds as a float)
                          timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
                          access_log=settings.access_log,
                          http=protocol(settings.header_timeout_s), h11_max_incomplete_event_size=MAX_HEAD_BYTES)).run()
    return EXIT_OK


def _setting_help(name: str) -> str:
    """A Settings field as an option's help: its meaning, default and environment variable."""
    from fitprobe.app.config import Settings

    field = Settings.model_fields[name]
    return f"{field.description} (default: {field.get_default(call_default_factory=True)}; env FITPROBE_{name.upper()})"


def _settings_text() -> str:
    """Every setting `serve` reads, from app/config.py's one Settings: most have no option, only a variable."""
    from fitprobe.app.config import Settings

    lines = ["settings (environment variables; the options above override theirs):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        lines.append(f"  FITPROBE_{name.upper()}  {field.description or ''} (default: "
                     f"{'none' if shown in (None, '') else shown})")
    return "\n".join(lines)


def cmd_devices(args: argparse.Namespace) -> int:
    from fitprobe.probe.devices import list_devices
    from fitprobe.probe.settings import operator_settings

    capacity = operator_settings().cpu_capacity_bytes
    print(json.dumps({"devices": list_devices(capacity)}, indent=2))
    return EXIT_OK


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the HTTP service (embedded SQLite, local workers)",
                                description="Run the HTTP service: the API, the dashboard at /, local workers.",
                                epilog=_settings_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, name, kind in (("--host", "host", str), ("--port", "port", int), ("--data-dir", "data_dir", str)):
        serve.add_argument(flag, type=kind, help=_setting_help(name))
    serve.set_defaults(run=cmd_serve)

    preflight = commands.add_parser("preflight", help="CI gate: exit 0 only when the plan is verified (or, with "
                                    "--accept-estimate, estimated within the headroom)",
                                    description=preflight_doc.splitlines()[0],
                                    epilog=preflight_doc.split("\n\n", 2)[2],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_preflight_options(preflight)
    preflight.set_defaults(run=cmd_preflight)

    devices = commands.add_parser("devices", help="list devices (NVML, or the CPU device)")
    devices.set_defaults(run=cmd_devices)


def build_parser() -> argparse.ArgumentParser:
    """Every command of `fitprobe`: the library's, then the service's."""
    return probe_cli.build_parser(register)


def main(argv: list[str] | None = None) -> int:
    return probe_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
