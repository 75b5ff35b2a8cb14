"""Server time of the simulated broker: the broker's zone, not UTC.

``ServerClock`` turns the injected UTC clock into server milliseconds and stamps new records.
With ``dst`` on, the offset follows the rule of most FX brokers: the base offset (GMT+2) in
winter, one hour more while US daylight saving time is in force, so that the FX week closes
at 17:00 New York all year. ``shift_seconds`` adds a fixed amount at once (tests force an
offset switch while a worker runs).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache

from worker.mt5 import api


def server_seconds(value: api.DateLike) -> int:
    """A history date as seconds of server time (naive datetimes are server wall clock)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return int(value.timestamp())
        return calendar.timegm(value.timetuple())
    return int(value)


def _nth_sunday(year: int, month: int, n: int) -> int:
    """Day of the month of the n-th Sunday."""
    first_weekday = calendar.weekday(year, month, 1)  # Monday 0 .. Sunday 6
    return 1 + (6 - first_weekday) % 7 + 7 * (n - 1)


@lru_cache(maxsize=64)
def us_dst_bounds(year: int) -> tuple[int, int]:
    """UTC seconds when US DST starts (2nd Sunday of March, 02:00 EST = 07:00 UTC) and ends
    (1st Sunday of November, 02:00 EDT = 06:00 UTC) in ``year``."""
    start = calendar.timegm((year, 3, _nth_sunday(year, 3, 2), 7, 0, 0))
    end = calendar.timegm((year, 11, _nth_sunday(year, 11, 1), 6, 0, 0))
    return start, end


def us_dst_in_force(utc_seconds: float) -> bool:
    start, end = us_dst_bounds(time.gmtime(utc_seconds).tm_year)
    return start <= utc_seconds < end


class ServerClock:
    """UTC from the injected clock, server time = UTC + the broker's offset at that instant."""

    def __init__(self, clock: Callable[[], float], offset_seconds: int) -> None:
        self._clock = clock
        self._base_ms = offset_seconds * 1000
        self._dst = False
        self._shift_ms = 0
        self.last_utc_ms = 0  # UTC ms of the newest record (persisted)

    def configure(self, *, dst: bool, shift_seconds: int) -> None:
        self._dst = dst
        self._shift_ms = shift_seconds * 1000

    def now(self) -> float:
        """UTC seconds."""
        return self._clock()

    def offset_ms(self, utc_seconds: float) -> int:
        offset = self._base_ms + self._shift_ms
        if self._dst and us_dst_in_force(utc_seconds):
            offset += 3_600_000
        return offset

    def server_ms(self) -> int:
        now = self._clock()
        return int(now * 1000) + self.offset_ms(now)

    def stamp(self) -> int:
        """Server time (ms) of a new record. The UTC instant never goes backwards; the server
        time does when the offset falls back (it repeats an hour, as a real server's does)."""
        self.last_utc_ms = max(int(self._clock() * 1000), self.last_utc_ms)
        return self.last_utc_ms + self.offset_ms(self.last_utc_ms / 1000.0)

    @property
    def last_stamp(self) -> int:
        """Server ms of the newest record at today's offset."""
        return self.last_utc_ms + self.offset_ms(self.last_utc_ms / 1000.0)
