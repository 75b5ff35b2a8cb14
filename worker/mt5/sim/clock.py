"""Server time of the simulated broker: the broker's zone, not UTC.

``ServerClock`` turns the injected UTC clock into server milliseconds and stamps new records.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable
from datetime import datetime

from worker.mt5 import api


def server_seconds(value: api.DateLike) -> int:
    """A history date as seconds of server time (naive datetimes are server wall clock)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return int(value.timestamp())
        return calendar.timegm(value.timetuple())
    return int(value)


class ServerClock:
    """UTC from the injected clock, server time = UTC + the broker's offset."""

    def __init__(self, clock: Callable[[], float], offset_seconds: int) -> None:
        self._clock = clock
        self._offset_ms = offset_seconds * 1000
        self.last_stamp = 0  # server ms of the newest record (persisted)

    def now(self) -> float:
        """UTC seconds."""
        return self._clock()

    def offset_ms(self, utc_seconds: float) -> int:
        del utc_seconds
        return self._offset_ms

    def server_ms(self) -> int:
        now = self._clock()
        return int(now * 1000) + self.offset_ms(now)

    def stamp(self) -> int:
        """Server time (ms) of a new record; never goes backwards so history stays sorted."""
        self.last_stamp = max(self.server_ms(), self.last_stamp)
        return self.last_stamp
