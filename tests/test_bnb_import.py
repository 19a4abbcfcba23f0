"""bitsandbytes' import must not keep a trial's frames alive (probe/bnb.py says how it did)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
# a logging handler that keeps its records (as pytest's capture and in-memory buffers do), then the import from
# inside a function whose frame stands for a trial's; prints the names of the frames the records keep alive
SCRIPT = """
import logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record)
logging.getLogger().addHandler(Keep())

def trial():
    batch = bytearray(1 << 20)  # what a trial's frame holds
    if sys.argv[1] == "plain":
        import bitsandbytes
    else:
        from fitprobe.probe.bnb import import_bitsandbytes
        import_bitsandbytes("a test")

trial()
held = set()
for record in records:
    args = record.args if isinstance(record.args, tuple) else ()
    for exc in [a for a in args if isinstance(a, BaseException)] + [record.exc_info[1] if record.exc_info else None]:
        frame = exc.__traceback__.tb_frame if exc is not None and exc.__traceback__ else None
        while frame is not None:
            held.add(frame.f_code.co_name)
            frame = frame.f_back
print("held:" + ",".join(sorted(held)))
"""


def _frames_held(how: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    # the last line, marked: an empty set prints an empty list, not an empty output (a CPU whose bitsandbytes logs
    # nothing at import holds no frame at all)
    (held,) = [line.removeprefix("held:") for line in run.stdout.splitlines() if line.startswith("held:")]
    return set(filter(None, held.split(",")))


def test_importing_bitsandbytes_keeps_no_frame_of_the_trial_that_needed_it():
    plain = _frames_held("plain")
    # where bitsandbytes logs an exception at import (a CPU with AVX512-BF16 asking the Hub for a kernel), a plain
    # import inside the trial keeps the trial's frame; the import fitprobe does never does
    assert "trial" not in _frames_held("fitprobe"), "the trial's frame is kept alive by a logged record"
    print("a plain import keeps:", sorted(plain))
