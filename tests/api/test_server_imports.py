"""The service's process imports no torch: every model is built in a job or the sizer, forked from the fork server
that imported torch once (app/executors/job_preload.py)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft")


def test_importing_the_service_and_its_command_imports_no_torch_transformers_or_peft():
    # torch alone is ~3.7 s of CPU per server process on the 2-core test host, and the suite starts dozens
    check = ("import sys\n"
             "import fitprobe.app.main\n"
             "from fitprobe.app import cli\n"
             "cli.build_parser()  # what `fitprobe serve` and `fitprobe preflight` parse with\n"
             f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "[]", run.stdout + run.stderr
