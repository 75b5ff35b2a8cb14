"""Seeded price paths and weekly market schedules of the simulated broker.

A price is a pure function of (seed, symbol, time): a sum of value-noise octaves whose
amplitudes scale like a random walk (sigma * sqrt(period)), so any instant can be priced
without replaying history, two runs with the same seed see the same prices, and evaluating it
costs a few dozen integer operations. ``Market`` holds the symbols of one simulated terminal:
their specifications, Market Watch selection, quotes in server time and trading hours.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace
from typing import Any

from worker.mt5 import api
from worker.mt5.sim.clock import ServerClock
from worker.mt5.sim.config import WEEK_SECONDS, SimConfig, SimSymbol

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


class Market:
    """Symbols, Market Watch selection, ticks (cached per price step) and schedules."""

    def __init__(self, config: SimConfig, clock: ServerClock) -> None:
        self._seed = config.seed
        self._interval = config.tick_interval_ms
        self._clock = clock
        self.symbols: dict[str, SimSymbol] = dict(config.symbols)
        self._paths = {n: PricePath(self._seed, s) for n, s in self.symbols.items()}
        self._schedules = {n: Schedule(s.closed_windows()) for n, s in self.symbols.items()}
        self.selected = {n for n, s in self.symbols.items() if s.visible}
        self._tick_cache: dict[str, tuple[int, int, api.Tick]] = {}

    def update(self, name: str, **changes: Any) -> SimSymbol:
        symbol = replace(self.symbols[name], **changes)
        self.symbols[name] = symbol
        self._paths[name] = PricePath(self._seed, symbol)
        self._schedules[name] = Schedule(symbol.closed_windows())
        self._tick_cache.pop(name, None)
        return symbol

    def tick(self, name: str) -> api.Tick:
        symbol = self.symbols[name]
        interval = self._interval
        moment = self._schedules[name].last_open(self._clock.now())
        quantum = int(moment * 1000) // interval
        utc_ms = quantum * interval
        offset = self._clock.offset_ms(utc_ms / 1000.0)
        cached = self._tick_cache.get(name)
        if cached is not None and cached[0] == quantum and cached[1] == offset:
            return cached[2]
        spread = symbol.spread_points * symbol.point
        bid = round(self._paths[name].mid(utc_ms / 1000.0) - spread / 2, symbol.digits)
        ask = round(bid + spread, symbol.digits)
        server_ms = utc_ms + offset
        tick = api.Tick(
            time=server_ms // 1000,
            bid=bid,
            ask=ask,
            last=0.0,
            volume=0,
            time_msc=server_ms,
            flags=6,  # TICK_FLAG_BID | TICK_FLAG_ASK
            volume_real=0.0,
        )
        self._tick_cache[name] = (quantum, offset, tick)
        return tick

    def price_for(self, name: str, order_type: int) -> float:
        tick = self.tick(name)
        return tick.ask if order_type == api.ORDER_TYPE_BUY else tick.bid

    def is_open(self, name: str) -> bool:
        return self._schedules[name].is_open(self._clock.now())

    def symbol_info(self, name: str, tick_value_rate: float) -> api.SymbolInfo:
        symbol = self.symbols[name]
        tick = self.tick(name)
        selected = name in self.selected
        return api.SymbolInfo(
            name=name,
            visible=selected,
            select=selected,
            digits=symbol.digits,
            point=symbol.point,
            spread=symbol.spread_points,
            trade_contract_size=symbol.contract_size,
            trade_tick_size=symbol.point,
            trade_tick_value=symbol.contract_size * symbol.point * tick_value_rate,
            volume_min=symbol.volume_min,
            volume_max=symbol.volume_max,
            volume_step=symbol.volume_step,
            trade_mode=symbol.trade_mode,
            trade_exemode=symbol.trade_exemode,
            filling_mode=symbol.filling_mode,
            currency_base=symbol.currency_base,
            currency_profit=symbol.currency_profit,
            currency_margin=symbol.currency_margin,
            bid=tick.bid if selected else 0.0,
            ask=tick.ask if selected else 0.0,
            time=tick.time if selected else 0,
            description=symbol.description,
            path=symbol.path,
            trade_stops_level=symbol.trade_stops_level,
            trade_freeze_level=symbol.trade_freeze_level,
        )
