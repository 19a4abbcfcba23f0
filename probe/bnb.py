"""bitsandbytes, imported once and from a thread of its own, so its import can never hold a trial's tensors.

`import bitsandbytes` loads its CPU backend, which on CPUs with AVX512-BF16 asks the Hub for a kernel
(`kernels.get_kernel`) and, offline, logs the failure with the exception as an argument. That exception's
traceback references every frame above the import through `f_back`: imported lazily inside a trial (the
first 8-bit optimizer or QLoRA build), those frames are the trial's, and a logging handler that keeps its
records (pytest's log capture, a service's in-memory buffer) keeps the trial's batches and states alive for
good. The next trials then start with bytes the step did not allocate, and the cuts an extrapolated
estimate is traced from disagree (tests/test_extrapolate.py caught it: 8-bit AdamW on mistral). Imported
in a thread, the traceback reaches only that thread's two frames.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

from fitprobe.probe.spec import SpecError


def import_bitsandbytes(needed_for: str) -> ModuleType:
    """The bitsandbytes module; a SpecError that says how to install it when it is missing."""
    if "bitsandbytes" not in sys.modules:
        failure: list[BaseException] = []

        def load() -> None:
            try:
                importlib.import_module("bitsandbytes")
            except ImportError as exc:
                failure.append(exc)

        loader = threading.Thread(target=load, name="import-bitsandbytes")
        loader.start()
        loader.join()
        if failure:
            raise SpecError(f"{needed_for} needs bitsandbytes: pip install 'fitprobe[hf]'") from failure[0]
    return sys.modules["bitsandbytes"]
