"""What the fork server imports once, so that no job (or model sizer) imports it again (app/executors/forked.py).

Imported by the fork server only, and first of all it binds that process to die with the service's
thread that started it (app/executors/forked.py: one that lives as long as the service).
multiprocessing ends a fork server when every holder of its pipe's write end is gone, but every job
forked from it holds one, and each job lives while the fork server does: killed with `kill -9`, the
service would leave both running.

Imports only: the fork server must not run a torch op (an OpenMP or intra-op thread pool started before
`fork` is unusable in the child) nor touch CUDA (a CUDA context does not survive a fork). peft is left
to the jobs that fine-tune with LoRA: importing it (with accelerate and bitsandbytes) costs more than
the rest together, and a service whose jobs never use it would pay that once for nothing.
"""

from __future__ import annotations

from fitprobe.probe.lifetime import die_with_parent

die_with_parent()

import torch  # noqa: E402, F401 - the import is the point

import fitprobe.probe.forked  # noqa: E402 - its FORK_SERVER_PID, read here, is this fork server's pid

import fitprobe.app.sizer  # noqa: E402 - the model sizer forks from here too
import fitprobe.app.worker  # noqa: E402
import fitprobe.probe.job  # noqa: E402
import fitprobe.probe.models.load  # noqa: E402
import fitprobe.probe.recommend  # noqa: E402
import fitprobe.probe.whatif  # noqa: E402 - the table the what-if job fills (whatif_spec imports it only there)
import fitprobe.probe.whatif_spec  # noqa: E402, F401

try:
    import transformers.modeling_utils  # noqa: F401 - every Hugging Face model's base class and loading code
except ImportError:  # the hf extra is optional: builtin models need none
    pass
