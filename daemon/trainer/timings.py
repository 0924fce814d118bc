"""Where a job's seconds went: named laps from the trainer's start to the verdict, kept in the version's
metadata (`seconds`) so that a slow job can be explained after the fact (the go-to-first-step gap of issue 14)."""

from __future__ import annotations

import time


class Laps:
    """Consecutive named intervals: `mark(name)` closes the lap that began at the previous mark (or at creation).
    A name marked twice adds up (a retried phase); `as_dict` keeps the order of first marks."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._laps: dict[str, float] = {}

    def mark(self, name: str) -> float:
        now = time.monotonic()
        took = now - self._last
        self._laps[name] = self._laps.get(name, 0.0) + took
        self._last = now
        return took

    def as_dict(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self._laps.items()}
