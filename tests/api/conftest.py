"""The service two ways: in this process through FastAPI's TestClient, for route logic (what a route
answers, refuses, exports), and as a real uvicorn server in a subprocess on 127.0.0.1 with its own data
dir, where the wire itself is under test (streams, body limits, signals, the browser, slow clients)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from fitprobe.app.config import Settings
from fitprobe.app.main import create_app

FAST_JOB = {"model": "builtin:gpt-nano", "seq_len": 32, "precision": "fp32", "capacity_bytes": 16 << 20, "effective_batch": 24}
# still running when a test cancels, kills or restarts around it (~30 s), asleep rather than computing: its model
# sleeps in every forward (tests/factories.py). Every service the tests start allow-lists its factory.
SLOW_FACTORY = "tests.factories:sleepy_lm"
SLOW_JOB = {"model": f"factory:{SLOW_FACTORY}", "seq_len": 8, "precision": "fp32", "capacity_bytes": 16 << 20,
            "reuse": False}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen
    env: dict[str, str]

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def in_process(data_dir: Path, **settings: str) -> Iterator[TestClient]:
    """The app with its lifespan (database, worker thread, job processes) but no uvicorn: starting one costs
    seconds on the 2-core machine. The Host is a loopback name, which the app's Host check lets through."""
    app = create_app(Settings(data_dir=data_dir, **{"allowed_factories": SLOW_FACTORY, **settings}))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


# the environment of a service restarted only so that a test sees its interrupted SLOW_JOB finish there: the rerun
# sleeps 0.05 s a forward instead of 1.5 s (tests/factories.py), seconds instead of ~30 s of a worker held asleep
HURRIED_SLEEPY_JOBS = {"SLEEPY_LM_SLEEP_S": "0.05"}


def start_server(data_dir: Path, port: int | None = None, env: dict[str, str] | None = None,
                 **settings: str) -> Server:
    """A uvicorn service on `port` (a free one by default); `settings` become its FITPROBE_* variables and `env`
    goes into its environment as it is."""
    port = port or free_port()
    settings = {"allowed_factories": SLOW_FACTORY, **settings}
    env = {**os.environ, **{f"FITPROBE_{k.upper()}": v for k, v in settings.items()}, "OMP_NUM_THREADS": "1",
           **(env or {})}
    log = open(data_dir.parent / f"server-{port}.log", "ab")  # noqa: SIM115 - the server writes it while it lives
    process = subprocess.Popen([sys.executable, "-m", "fitprobe.app.cli", "serve", "--port", str(port),
                                "--data-dir", str(data_dir)], env=env, stdout=log, stderr=log)
    server = Server(f"http://127.0.0.1:{port}", data_dir, process, env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert process.poll() is None, (data_dir.parent / f"server-{port}.log").read_text()[-3000:]
        time.sleep(0.2)
    server.stop()
    raise AssertionError("server did not become ready in 60s")


def gone(process: psutil.Process) -> bool:
    """Dead: no such process, or a zombie waiting for whoever reaps it."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout_s: float = 180,
             predicate=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/probes/{job_id}").json()
        if job["status"] in statuses and (predicate is None or predicate(job)):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("service")
    running = start_server(root / "data")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    """One in-process app per module, as `server` is one uvicorn per module."""
    with in_process(tmp_path_factory.mktemp("app") / "data") as client:
        yield client
