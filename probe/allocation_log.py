"""A trial's allocation log: its events, typed, and the one walk that reads them.

Under fake tensors a trial is a program of allocations, frees and moments; probe/meter.py LiveBytesMode
writes it down when asked. At another micro-batch or seq_len the step runs the same program with other
sizes, so the log keeps the sizes apart from the events: probe/estimate/replay.py compares two logs' events
and replays one with the sizes it predicts.

The events, in program order. An allocation's `number` is its position in the log's `sizes` (requested
bytes, before rounding) and `categories` (probe/breakdown.py's, given when it was allocated); a storage
counted before the log began has no number, and its `n_bytes` are rounded, as the meter counted them.

| kind            | event                             | what happened                                                   |
| --------------- | --------------------------------- | --------------------------------------------------------------- |
| ALLOCATE        | Allocate(number)                  | a storage allocated                                             |
| FREE            | Free(number)                      | that allocation's storage freed                                 |
| FREE_EARLIER    | FreeEarlier(n_bytes, category)    | a storage counted before the log freed                          |
| MOMENT          | Moment()                          | a moment the trace records: after an op that allocated, a       |
|                 |                                   | storage grown in place                                          |
| PHASE_CHANGE    | PhaseChange(name)                 | the step enters phase `name`; a moment too                      |
| TRIAL_START     | TrialStart()                      | the trial starts: peaks reset, what is live becomes weights; a  |
|                 |                                   | moment too                                                      |
| RESIZE          | Resize(number)                    | a storage resized in place (FSDP2; number None: counted before  |
|                 |                                   | the log): not replayed                                          |
| RECLASS         | Reclass(number, category)         | that allocation's storage given another category                |
| RECLASS_EARLIER | ReclassEarlier(n_bytes, old, new) | a storage counted before the log given another category         |
| KEEP            | Keep()                            | the forward's temporaries kept for the backward (they become    |
|                 |                                   | activations)                                                    |

Events compare equal by kind and fields, and hash; they have no order of their own (`frees_in_order` sorts
frees by an explicit key). A reader of logs is a `Reader`, one method per kind; `walk` calls it, the one
place that dispatches on an event's kind.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, get_args


class Kind(enum.IntEnum):
    """An event's kind (the table above): each has its class, and its method in a `Reader`."""

    ALLOCATE = 0
    FREE = 1
    FREE_EARLIER = 2
    MOMENT = 3
    PHASE_CHANGE = 4
    TRIAL_START = 5
    RESIZE = 6
    RECLASS = 7
    RECLASS_EARLIER = 8
    KEEP = 9


@dataclass(frozen=True, slots=True)
class Allocate:
    kind: ClassVar[Kind] = Kind.ALLOCATE
    number: int


@dataclass(frozen=True, slots=True)
class Free:
    kind: ClassVar[Kind] = Kind.FREE
    number: int


@dataclass(frozen=True, slots=True)
class FreeEarlier:
    kind: ClassVar[Kind] = Kind.FREE_EARLIER
    n_bytes: int
    category: int


@dataclass(frozen=True, slots=True)
class Moment:
    kind: ClassVar[Kind] = Kind.MOMENT


@dataclass(frozen=True, slots=True)
class PhaseChange:
    kind: ClassVar[Kind] = Kind.PHASE_CHANGE
    name: str


@dataclass(frozen=True, slots=True)
class TrialStart:
    kind: ClassVar[Kind] = Kind.TRIAL_START


@dataclass(frozen=True, slots=True)
class Resize:
    kind: ClassVar[Kind] = Kind.RESIZE
    number: int | None


@dataclass(frozen=True, slots=True)
class Reclass:
    kind: ClassVar[Kind] = Kind.RECLASS
    number: int
    category: int


@dataclass(frozen=True, slots=True)
class ReclassEarlier:
    kind: ClassVar[Kind] = Kind.RECLASS_EARLIER
    n_bytes: int
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class Keep:
    kind: ClassVar[Kind] = Kind.KEEP


LogEvent = (Allocate | Free | FreeEarlier | Moment | PhaseChange | TrialStart | Resize | Reclass | ReclassEarlier
            | Keep)


@dataclass
class AllocationLog:
    """A trial's events in program order (the table above), with the allocations' sizes and categories kept apart."""

    start_bytes: int
    start_phase: str
    events: list[LogEvent] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    categories: list[int] = field(default_factory=list)
    numbers: dict[int, int] = field(default_factory=dict)  # id(storage) -> its allocation's number, while live


class Reader(Protocol):
    """What one reader of a log does at each kind of event: a method per kind, named after it (FREE_EARLIER:
    `free_earlier`)."""

    def allocate(self, event: Allocate) -> None: ...
    def free(self, event: Free) -> None: ...
    def free_earlier(self, event: FreeEarlier) -> None: ...
    def moment(self, event: Moment) -> None: ...
    def phase_change(self, event: PhaseChange) -> None: ...
    def trial_start(self, event: TrialStart) -> None: ...
    def resize(self, event: Resize) -> None: ...
    def reclass(self, event: Reclass) -> None: ...
    def reclass_earlier(self, event: ReclassEarlier) -> None: ...
    def keep(self, event: Keep) -> None: ...


def walk(events: Iterable[LogEvent], reader: Reader) -> None:
    """Hand each event to `reader`'s method for its kind, in program order: the one place a log is dispatched on."""
    by_kind: dict[Kind, Callable[[Any], None]] = {
        Kind.ALLOCATE: reader.allocate, Kind.FREE: reader.free, Kind.FREE_EARLIER: reader.free_earlier,
        Kind.MOMENT: reader.moment, Kind.PHASE_CHANGE: reader.phase_change, Kind.TRIAL_START: reader.trial_start,
        Kind.RESIZE: reader.resize, Kind.RECLASS: reader.reclass, Kind.RECLASS_EARLIER: reader.reclass_earlier,
        Kind.KEEP: reader.keep,
    }
    # looked up by the event's class, a few per cent faster than by its kind: replay's hot loop runs through here
    on = {event_class: by_kind[event_class.kind] for event_class in get_args(LogEvent)}
    for event in events:
        on[type(event)](event)


def frees_in_order(events: list[LogEvent]) -> list[LogEvent]:
    """A copy of the events with each run of frees sorted: storages freed together (a tuple of outputs dropped) go
    in an order that varies from run to run, and frees alone change no moment and no peak.

    A run also takes the category changes between its frees (a gradient tagged in a hook while a tuple dies),
    kept in their order ahead of the frees: a change never touches a storage freed before it, and the bytes
    by category at the next moment are the same whichever of the two came first.
    """
    ordering = _FreesInOrder()
    walk(events, ordering)
    return ordering.finished()


def _free_order(event: Free | FreeEarlier) -> tuple[int, int, int]:
    """Frees of the log's allocations by number, then those of earlier storages by bytes and category: any fixed
    order would do, sorting only makes a run canonical."""
    return (0, event.number, 0) if isinstance(event, Free) else (1, event.n_bytes, event.category)


class _FreesInOrder:
    """`frees_in_order`'s reader: frees gather in a run and category changes ahead of them, until any other event."""

    def __init__(self) -> None:
        self.ordered: list[LogEvent] = []
        self.retags: list[LogEvent] = []
        self.run: list[Free | FreeEarlier] = []

    def finished(self) -> list[LogEvent]:
        self._close_run()
        return self.ordered

    def _close_run(self) -> None:
        run = sorted(self.run, key=_free_order)
        self.ordered += self.retags
        self.ordered += run
        self.retags, self.run = [], []

    def _in_run(self, event: Free | FreeEarlier) -> None:
        self.run.append(event)

    def _ahead_of_run(self, event: Reclass | ReclassEarlier | Keep) -> None:
        self.retags.append(event)

    def _ends_run(self, event: Allocate | Moment | PhaseChange | TrialStart | Resize) -> None:
        self._close_run()
        self.ordered.append(event)

    free = free_earlier = _in_run
    reclass = reclass_earlier = keep = _ahead_of_run
    allocate = moment = phase_change = trial_start = resize = _ends_run
