"""What the ranks' fork server imports once, so that no rank imports it again (probe/forked.py, probe/verify/ranks.py).

Imported by that fork server only, and first of all it binds the server to die with the thread that started it
(a thread that lives as long as the job or command that spawns ranks). Imports only: no torch op, no CUDA (a
CUDA context does not survive a fork; each rank makes its own).
"""

from __future__ import annotations

from fitprobe.probe.lifetime import die_with_parent

die_with_parent()

import torch  # noqa: E402, F401 - the import is the point

import fitprobe.probe.forked  # noqa: E402 - its FORK_SERVER_PID, read here, is this fork server's pid
import fitprobe.probe.sharding  # noqa: E402 - the process group every rank joins
import fitprobe.probe.verify.run  # noqa: E402, F401 - the verification's and the sharded trials' rank entries

try:
    import transformers.modeling_utils  # noqa: F401 - the models ranks build
except ImportError:  # the hf extra is optional: builtin models need none
    pass
