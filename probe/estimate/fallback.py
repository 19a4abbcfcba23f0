"""`Fallback`: the one way an estimate shortcut says it does not apply.

Extrapolating from two cuts (extrapolate.py) and replaying learned size laws (replay.py) are exact only
where their assumptions hold: a decoder whose layers repeat, traces that pair up moment by moment, sizes
that follow a law. Wherever one of them finds out that it does not hold, it raises `Fallback(reason)`
with the reason in words a user reads in the report (`model.not_extrapolated_because`). The caller that
chose the shortcut catches it and runs the plain path instead: a fresh single estimate in
probe/make_trial.py, a switch to the full depth mid-search in `ExtrapolatedTrial`, the what-if table's
build in probe/whatif.py `Builds`. No shortcut returns its refusal as a value, so a refusal cannot be
mistaken for a result and every signature says what it gives.
"""

from __future__ import annotations


class Fallback(Exception):
    """This shortcut does not apply; `reason` says why, as the report states it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
