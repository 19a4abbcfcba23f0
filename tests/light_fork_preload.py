"""A fork server's preload with nothing heavy in it (tests/test_lifetime.py): what every preload does first, the
guard, and the import that records the fork server's pid."""

from fitprobe.probe.lifetime import die_with_parent

die_with_parent()

import fitprobe.probe.forked  # noqa: E402, F401 - its FORK_SERVER_PID, read here, is this fork server's pid
