"""The server's clock: its offset from UTC (DOMAIN.md 6). One clock for every tick and window.

Server time is the broker's zone, and most FX brokers switch it with US daylight saving
(GMT+2 in winter, GMT+3 in summer). The offset is, in order of precedence:

- configured as a fixed offset (``SERVER_UTC_OFFSET_SECONDS``), or as a time-zone rule
  (``SERVER_TIMEZONE``, e.g. ``GMT+2/US-DST``: +2, one hour more while US DST is in force;
  ``/EU-DST`` follows the EU dates; no suffix = fixed);
- else learned from ticks, in both directions: a tick's server time minus local UTC,
  rounded to a whole quarter hour. A stale tick underestimates the offset, so an estimate
  only lowers the offset when the tick is *proven fresh*: its time changed since a reading
  of the same symbol less than five minutes earlier (it is then at most that old).
  Unproven estimates may only raise it (and not within ten minutes of a proof).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.config import SERVER_TIMEZONE_PATTERN

OFFSET_GRAIN_MS = 15 * 60 * 1000  # time zones are whole quarter hours
_PROOF_WINDOW_MS = 5 * 60 * 1000  # a tick new since a reading this recent is this fresh
_PROOF_HOLD_MS = 10 * 60 * 1000  # after a proof, unproven estimates are ignored this long
_LIMITS_MS = (-12 * 3600_000, 14 * 3600_000)
_HOUR_MS = 3600_000


def _nth_sunday(year: int, month: int, n: int) -> datetime:
    first = datetime(year, month, 1, tzinfo=UTC)
    return first + timedelta(days=(6 - first.weekday()) % 7 + 7 * (n - 1))


def _last_sunday(year: int, month: int) -> datetime:
    start = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC) - timedelta(days=1)
    return start - timedelta(days=(start.weekday() + 1) % 7)


def us_dst(at: datetime) -> bool:
    """US DST: second Sunday of March 02:00 EST (07:00 UTC) to first Sunday of November
    02:00 EDT (06:00 UTC)."""
    start = _nth_sunday(at.year, 3, 2) + timedelta(hours=7)
    end = _nth_sunday(at.year, 11, 1) + timedelta(hours=6)
    return start <= at < end


def eu_dst(at: datetime) -> bool:
    """EU summer time: last Sunday of March to last Sunday of October, 01:00 UTC."""
    start = _last_sunday(at.year, 3) + timedelta(hours=1)
    end = _last_sunday(at.year, 10) + timedelta(hours=1)
    return start <= at < end


@dataclass(frozen=True)
class TimezoneRule:
    """A standard offset, plus one hour while the chosen DST is in force."""

    standard_ms: int
    dst: str | None  # "US", "EU" or None

    def offset_ms_at(self, utc_seconds: float) -> int:
        at = datetime.fromtimestamp(utc_seconds, UTC)
        summer = (self.dst == "US" and us_dst(at)) or (self.dst == "EU" and eu_dst(at))
        return self.standard_ms + (_HOUR_MS if summer else 0)


def parse_timezone(text: str) -> TimezoneRule:
    """``UTC+2``, ``GMT+2/US-DST``, ``GMT+1/EU-DST``, ``UTC-3:30``; ValueError otherwise."""
    match = re.fullmatch(SERVER_TIMEZONE_PATTERN, text.strip())
    if match is None:
        raise ValueError(f"not a server time-zone rule: {text!r} (e.g. GMT+2/US-DST)")
    sign, hours, minutes, dst = match.groups()
    standard = (int(hours or 0) * 60 + int(minutes or 0)) * 60_000
    if sign == "-":
        standard = -standard
    if not _LIMITS_MS[0] <= standard <= _LIMITS_MS[1]:
        raise ValueError(f"server time-zone offset out of range: {text!r}")
    return TimezoneRule(standard, dst)


class ServerClock:
    """Server time = UTC + offset (configured, a rule, or learned from ticks)."""

    def __init__(
        self,
        clock: Callable[[], float],
        configured_offset_seconds: int | None = None,
        timezone: TimezoneRule | None = None,
    ) -> None:
        self._clock = clock
        self._configured_ms = (
            None if configured_offset_seconds is None else configured_offset_seconds * 1000
        )
        self._timezone = timezone
        self._learned_ms: int | None = None
        self._proven_at_ms: int | None = None
        self._last_seen: dict[str, tuple[int, int]] = {}  # symbol -> (tick msc, local ms)

    @property
    def configured(self) -> bool:
        return self._configured_ms is not None or self._timezone is not None

    def now(self) -> float:
        """Local UTC, seconds."""
        return self._clock()

    def offset_ms(self) -> int | None:
        if self._configured_ms is not None:
            return self._configured_ms
        if self._timezone is not None:
            return self._timezone.offset_ms_at(self._clock())
        return self._learned_ms

    def learn(self, symbol: str, tick_time_msc: int) -> None:
        """Learn from one tick of ``symbol`` (see the module docstring)."""
        if self.configured:
            return
        now_ms = int(self._clock() * 1000)
        previous = self._last_seen.get(symbol)
        self._last_seen[symbol] = (tick_time_msc, now_ms)
        estimate = round((tick_time_msc - now_ms) / OFFSET_GRAIN_MS) * OFFSET_GRAIN_MS
        if not _LIMITS_MS[0] <= estimate <= _LIMITS_MS[1]:
            return
        proven = (
            previous is not None
            and tick_time_msc != previous[0]
            and 0 <= now_ms - previous[1] <= _PROOF_WINDOW_MS
        )
        if proven:
            self._learned_ms = estimate
            self._proven_at_ms = now_ms
            return
        held = self._proven_at_ms is not None and now_ms - self._proven_at_ms < _PROOF_HOLD_MS
        if self._learned_ms is None or (estimate > self._learned_ms and not held):
            self._learned_ms = estimate
