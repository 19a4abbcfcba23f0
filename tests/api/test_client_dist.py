"""fitprobe-client as a CI runner installs it: a fresh venv, `pip install ./client`, no torch, a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.api.conftest import Server

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A venv that sees nothing of this machine's packages, with only the client (and httpx) in it."""
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    started_s = time.monotonic()
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(CLIENT_DIR)],
                             capture_output=True, text=True, timeout=300, env=_outside_the_repo())
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"pip install ./client into a fresh venv: {time.monotonic() - started_s:.1f} s")
    return venv


def _outside_the_repo() -> dict[str, str]:
    # PYTHONPATH would put the checkout's fitprobe_client (and probe/) in front of what pip installed
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=_outside_the_repo())


@pytest.mark.slow
def test_the_client_installs_without_torch_and_gates_a_real_probe(client_venv: Path, server: Server, tmp_path):
    installed = _run(client_venv, "python", "-c", "import importlib.util as u; "
                     "print([m for m in ('torch', 'fastapi', 'pydantic', 'probe', 'app') if u.find_spec(m)])",
                     cwd=tmp_path)
    assert installed.stdout.strip() == "[]", installed.stdout + installed.stderr

    help_run = _run(client_venv, "fitprobe-preflight", "--help", cwd=tmp_path)
    assert help_run.returncode == 0 and "--effective-batch" in help_run.stdout, help_run.stderr
    # ProbeSpec's options come from spec_options.json, which the client ships as package data
    for words in ("--sharding {none,fsdp}", "--collation {padded,packed,flattened}", "--lora-rank"):
        assert words in help_run.stdout, words

    run = _run(client_venv, "fitprobe-preflight", "--server", server.url, "--model", "builtin:gpt-nano",
               "--seq-len", "32", "--capacity", "16777216", "--effective-batch", "4", "--fresh", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("PASS: 4 = ") and "(verified; peak " in run.stdout, run.stdout
    assert run.stdout.count("\n") == 1, "one verdict line, as `fitprobe preflight` prints"
