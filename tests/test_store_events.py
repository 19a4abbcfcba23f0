"""The store's latest event of a type (a job's progress, as its list rows show it), on real SQLite and
PostgreSQL: one query over the JSON text, whose answer must be what decoding the whole log would give."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from fitprobe.app import migrate
from fitprobe.app.store import Store, events
from fitprobe.probe.events import EventType


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'fitprobe.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    store = Store(url)
    migrate.upgrade(store.engine)
    return store


def test_latest_event_is_the_newest_of_the_asked_type_among_mixed_events(store):
    job_id = store.create({"kind": "whatif"}, "fp", max_queued=10)["id"]
    other = store.create({"kind": "whatif"}, "fp2", max_queued=10)["id"]
    store.add_event(job_id, {"type": "phase", "phase": "estimating"})
    for done in (1, 2, 3):
        store.add_event(job_id, {"type": EventType.WHATIF_CELL, "done": done, "total": 9})
        store.add_event(job_id, {"type": "trial", "micro_batch": done})
    # the asked type's text nested in an event of another type, newer than every cell: not the answer
    store.add_event(job_id, {"type": "phase", "phase": "planning", "last": {"type": "whatif_cell", "done": 8}})
    store.add_event(other, {"type": EventType.WHATIF_CELL, "done": 7, "total": 9})  # another job's

    latest = store.latest_event(job_id, EventType.WHATIF_CELL)
    assert latest is not None and (latest["done"], latest["total"]) == (3, 9)
    decoded = [data for _, data in store.events_after(job_id, 0, 10_000) if data.get("type") == "whatif_cell"]
    assert latest == decoded[-1]  # what the whole log gives
    assert store.latest_event(job_id, EventType.RECOMMEND_CANDIDATE) is None
    assert store.latest_event("no-such-job", EventType.WHATIF_CELL) is None


def test_latest_event_passes_over_rows_that_are_not_json(store):
    """A database edited by hand: an unreadable row fails no query, and the newest readable event answers."""
    job_id = store.create({"kind": "recommend"}, "fp", max_queued=10)["id"]
    store.add_event(job_id, {"type": EventType.RECOMMEND_CANDIDATE, "done": 1, "total": 4})
    with store.engine.begin() as conn:
        conn.execute(events.insert().values(job_id=job_id, data='{"type": "recommend_candidate", "done": [[[',
                                            created_at=datetime.now(timezone.utc)))
    assert store.latest_event(job_id, EventType.RECOMMEND_CANDIDATE)["done"] == 1
