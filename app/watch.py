"""Cheap answers for watchers (dashboards, pipelines polling): an ETag per probe, compact list rows."""

from __future__ import annotations

import hashlib
from typing import Any

from fitprobe.app.store import JobRow


def etag_of(version: tuple[Any, ...]) -> str:
    """A strong ETag from `Store.version`: it changes whenever the probe's public JSON does."""
    return '"' + hashlib.blake2b(repr(version).encode(), digest_size=8).hexdigest() + '"'


def compact(job: JobRow) -> dict[str, Any]:
    """A list row: what a table shows, without trials and report (a few hundred bytes, not ~10 KB)."""
    result = job["result"] or {}
    search, plan, verification = result.get("search") or {}, result.get("plan"), result.get("verification")
    spec = job["spec"] or {}  # an unreadable stored row has no spec; its error says why
    return {key: job[key] for key in ("id", "status", "phase", "device", "cached", "error", "created_at",
                                      "started_at", "finished_at")} | {
        "model": spec.get("model") if isinstance(spec.get("model"), str) else "hf:inline",
        "spec": {key: spec.get(key) for key in ("seq_len", "effective_batch", "num_devices", "mode", "precision")},
        "max_micro_batch": search.get("max_micro_batch"), "safe_micro_batch": search.get("safe_micro_batch"),
        "trial_count": search.get("trial_count"),
        "plan": {key: plan.get(key) for key in ("micro_batch", "accumulation_steps", "num_devices", "effective_batch",
                                                "last_micro_batch", "exact", "equation")}
        | {"tokens_equation": (plan.get("tokens") or {}).get("equation")} if plan else None,
        "verified": verification["passed"] if verification else None,
        "does_not_fit": bool(result.get("does_not_fit")),
    }
