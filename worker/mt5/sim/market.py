"""Seeded price paths and weekly market schedules of the simulated broker.

A price is a pure function of (seed, symbol, time): a sum of value-noise octaves whose
amplitudes scale like a random walk (sigma * sqrt(period)), so any instant can be priced
without replaying history, two runs with the same seed see the same prices, and evaluating it
costs a few dozen integer operations.
"""

from __future__ import annotations

import math
import zlib

from worker.mt5.sim.config import WEEK_SECONDS, SimSymbol

_MASK = (1 << 64) - 1
_OCTAVES = 14  # periods 1 s .. 8192 s
_EPOCH_WEEKDAY_SHIFT = 3 * 86400  # 1970-01-01 was a Thursday: shift so Monday 00:00 is 0


def _mix(value: int) -> int:
    """splitmix64 finaliser: a fast, well-spread hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


class PricePath:
    """The mid price of one symbol as a function of UTC time (seconds)."""

    def __init__(self, seed: int, symbol: SimSymbol) -> None:
        self._key = _mix(seed ^ zlib.crc32(symbol.name.encode()))
        self._base = symbol.base_price
        self._amplitudes = tuple(
            symbol.volatility * math.sqrt(2.0**octave) for octave in range(_OCTAVES)
        )

    def _noise(self, octave: int, index: int) -> float:
        bits = _mix(self._key ^ _mix((octave << 48) ^ (index & 0xFFFFFFFFFFFF)))
        return (bits >> 11) * (2.0 / (1 << 53)) - 1.0  # uniform in [-1, 1)

    def mid(self, utc_seconds: float) -> float:
        total = 0.0
        for octave, amplitude in enumerate(self._amplitudes):
            position = utc_seconds / (1 << octave)
            index = math.floor(position)
            fraction = position - index
            smooth = fraction * fraction * (3.0 - 2.0 * fraction)
            a = self._noise(octave, index)
            b = self._noise(octave, index + 1)
            total += amplitude * (a + (b - a) * smooth)
        return self._base * math.exp(total)


class Schedule:
    """Weekly closed windows in UTC (e.g. Friday 22:00 to Sunday 22:00)."""

    def __init__(self, windows: tuple[tuple[int, int], ...]) -> None:
        self._windows = windows

    def _closed_since(self, utc_seconds: float) -> float | None:
        """Seconds since the current closed window began, or None when open."""
        week = (utc_seconds + _EPOCH_WEEKDAY_SHIFT) % WEEK_SECONDS
        for start, end in self._windows:
            if start <= end:
                if start <= week < end:
                    return week - start
            elif week >= start or week < end:  # the window wraps around Monday 00:00
                return (week - start) % WEEK_SECONDS
        return None

    def is_open(self, utc_seconds: float) -> bool:
        return self._closed_since(utc_seconds) is None

    def last_open(self, utc_seconds: float) -> float:
        """``utc_seconds`` when open, else the instant the market closed."""
        since = self._closed_since(utc_seconds)
        return utc_seconds if since is None else utc_seconds - since
