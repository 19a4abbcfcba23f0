"""A probe job's status: the one spelling for the store, the routes, the executors and the client.

It lives in the torch-free client, the package every part of fitprobe already imports (the service
and the library import units and the verdict from here too), so no import cycle can form. The page
(app/static/*.js) keeps the strings and points back here.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Stored as its value, sent as its value; a member equals its string (`JobStatus.QUEUED == "queued"`)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        # the value in f-strings and str() on every Python (enum.StrEnum, which does this, is 3.11+)
        return self.value


# a job in one of these holds its place in the queue or a device, and may still be cancelled
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)
# a job in one of these never changes again: clients stop following it, retention may delete it
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
