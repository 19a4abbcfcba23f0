"""Every process fitprobe forks dies with the process that forked it, from its first line: probe/forked.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fitprobe.probe.lifetime import EXIT_ORPHANED
from tests.api.conftest import gone

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_child_whose_fork_server_went_before_its_guard_exits_before_running_its_target(tmp_path):
    marker = tmp_path / "ran"
    # a process that no fork server forked stands for a child whose server died before the guard: its parent is
    # not the server whose pid the module holds
    run = subprocess.run([sys.executable, "-c", f"from fitprobe.probe import forked; forked._guarded(open, {str(marker)!r}, 'w')"],
                         timeout=60, check=False, cwd=ROOT, env=ENV)
    assert run.returncode == EXIT_ORPHANED and not marker.exists()


FORKS_AND_WAITS = """
import time
from fitprobe.probe.forked import start_forked
child = start_forked(["tests.light_fork_preload"], time.sleep, 600)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_forked_child_dies_with_the_process_that_forked_it_even_by_kill_9():
    parent = subprocess.Popen([sys.executable, "-c", FORKS_AND_WAITS], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=ENV)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert not gone(child) and child.ppid() != parent.pid  # the fork server's child, not the parent's
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child), "the forked child outlived the process that forked it"
    finally:
        if parent.poll() is None:
            parent.kill()


def rank_entry(rank: int, world_size: int) -> list[int]:
    """A rank that returns who it is: probe/verify/ranks.py's protocol with nothing else in it."""
    return [rank, world_size]


# a user's script with no `if __name__ == "__main__":`, as a notebook exported to a file is
UNGUARDED_SCRIPT = """
import os
from fitprobe.probe.verify.ranks import spawn_ranks
from tests.test_lifetime import rank_entry
print("top level", os.getpid(), flush=True)
print("results", spawn_ranks(rank_entry, 2, "cpu", ()).results, flush=True)
"""


def test_ranks_started_from_a_script_without_a_main_guard_do_not_run_the_script_again(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=False,
                         cwd=tmp_path, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len([line for line in lines if line.startswith("top level")]) == 1, run.stdout
    assert "results [[0, 2], [1, 2]]" in lines, run.stdout
