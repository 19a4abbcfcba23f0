"""Versions from installed package metadata: pyproject.toml's `version` is the one place fitprobe's is written.

The report's provenance, the result cache's fingerprint, `fitprobe --version` and the OpenAPI document
all read it here, so a release changes one line and every answer says which code produced it.
"""

from __future__ import annotations

from importlib import metadata


def distribution_version(dist: str) -> str | None:
    """The installed version of `dist`, or None when it is not installed (a bare checkout on PYTHONPATH)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fitprobe_version() -> str:
    """fitprobe's version for people and documents (the CLI, the API docs), which need a string."""
    return distribution_version("fitprobe") or "unknown (not installed)"
