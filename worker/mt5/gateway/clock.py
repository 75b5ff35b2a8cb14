"""The server's clock: its offset from UTC, configured or learned from ticks (DOMAIN.md 6)."""

from __future__ import annotations

from collections.abc import Callable

OFFSET_GRAIN_MS = 15 * 60 * 1000  # time zones are whole quarter hours


class ServerClock:
    """Server time = UTC + offset; the offset is configured, else learned from ticks."""

    def __init__(self, clock: Callable[[], float], configured_offset_seconds: int | None) -> None:
        self._clock = clock
        self._configured_ms = (
            None if configured_offset_seconds is None else configured_offset_seconds * 1000
        )
        self._learned_ms: int | None = None

    def now(self) -> float:
        """Local UTC, seconds."""
        return self._clock()

    def offset_ms(self) -> int | None:
        if self._configured_ms is not None:
            return self._configured_ms
        return self._learned_ms

    def learn(self, tick_time_msc: int) -> None:
        """Learn the server's UTC offset from a tick (rounded to a quarter hour).

        A stale tick underestimates the offset, so the largest estimate wins: after one
        fresh tick of any symbol the offset is right, and it never decreases.
        """
        if self._configured_ms is not None:
            return
        estimate = tick_time_msc - int(self._clock() * 1000)
        rounded = round(estimate / OFFSET_GRAIN_MS) * OFFSET_GRAIN_MS
        if not -12 * 3600_000 <= rounded <= 14 * 3600_000:
            return
        if self._learned_ms is None or rounded > self._learned_ms:
            self._learned_ms = rounded
