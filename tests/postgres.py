"""A real PostgreSQL server for the tests, in a temporary directory, on 127.0.0.1 and a free port.

The binaries are Debian's (`apt-get install -y postgresql`, as .ci/run does); the server is the
tests' own (initdb, pg_ctl), never the system cluster. PostgreSQL refuses to run as root, so as
root it runs as the `postgres` user the package creates. Missing binaries are an error, not a
skip: CI installs them, and a suite that silently skips its PostgreSQL tests proves nothing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

INSTALL_HINT = "install Debian's PostgreSQL (`apt-get install -y postgresql`, as .ci/run does)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise RuntimeError("no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin or on PATH: "
                       f"{INSTALL_HINT}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """Run a throwaway server; yields the URL of its maintenance database `postgres`, user `fitprobe`."""
    bin_dir = _bin_dir()
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="fitprobe-pg-"))  # not pytest's tmp_path: that is 0700 for root only
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): "
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "fitprobe", "--auth=trust", "-E", "UTF8", "--no-sync")
    # fsync off: a test database need not survive a power cut, and the shared disk is slow
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://fitprobe@127.0.0.1:{port}/postgres"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A new, empty database on the server; its URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
