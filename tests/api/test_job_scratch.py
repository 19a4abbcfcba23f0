"""A job's temporary files go when the job goes, however it ends: a cancelled job skips every cleanup of its own."""

from __future__ import annotations

import time
from pathlib import Path

from tests.api.conftest import in_process


def _entries(scratch: Path) -> list[Path]:
    return sorted(scratch.rglob("*"))


def test_a_cancelled_jobs_temporary_files_are_removed_with_it(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with in_process(tmp_path / "data", scratch_dir=str(scratch),
                    allowed_factories="tests.factories:scratch_writing_lm") as client:
        job = client.post("/v1/probes", json={"model": "factory:tests.factories:scratch_writing_lm", "seq_len": 8,
                                              "capacity_bytes": 16 << 20, "reuse": False})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("left-by-the-job-") for p in _entries(scratch)):
            assert time.monotonic() < deadline, "the job never wrote its temporary file"
            time.sleep(0.2)
        left = next(p for p in _entries(scratch) if p.name.startswith("left-by-the-job-"))
        assert left.parent.name.startswith(f"fitprobe-job-{job.json()['id']}-")  # the job's TMPDIR, its own
        assert client.delete(f"/v1/probes/{job.json()['id']}").status_code in (200, 202)
        deadline = time.monotonic() + 30
        while _entries(scratch):
            assert time.monotonic() < deadline, f"left behind: {_entries(scratch)}"
            time.sleep(0.2)
