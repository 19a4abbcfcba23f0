"""Every process fitprobe starts dies with its parent, from its first line: probe/lifetime.py."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

from fitprobe.probe.lifetime import EXIT_ORPHANED, start_guarded


def test_a_process_whose_parent_is_already_gone_exits_before_running_its_target(tmp_path):
    marker = tmp_path / "ran"
    not_my_parent = str(os.getpid() + 1_000_000)  # what getppid() no longer returns once the parent died
    run = subprocess.run([sys.executable, "-m", "fitprobe.probe.lifetime", not_my_parent],
                         input=pickle.dumps(sys.path) + pickle.dumps((marker.touch, ())), timeout=60, check=False)
    assert run.returncode == EXIT_ORPHANED and not marker.exists()


def test_a_guarded_process_runs_its_target_without_importing_torch_first(tmp_path):
    out = tmp_path / "modules"
    process = start_guarded(_write_loaded_modules, (str(out),))
    assert process.wait(timeout=60) == 0
    assert "torch" not in out.read_text().split()


def _write_loaded_modules(path: str) -> None:
    from pathlib import Path

    Path(path).write_text(" ".join(sys.modules))
