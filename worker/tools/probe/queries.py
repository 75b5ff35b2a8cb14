"""Terminal queries for the probe: a None answer is counted, then asked again.

Real servers answer None to some history and position queries while connected (DOMAIN.md
2); the probe measures how often (``history_none_rate``) and never reads None as "nothing".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from worker.errors import WorkerError
from worker.mt5 import api

T = TypeVar("T")
ATTEMPTS = 20
PAUSE_SECONDS = 0.005


class ProbeQueryFailed(WorkerError):
    """A query answered None every time it was asked (message: the call and last_error)."""


@dataclass
class Queries:
    terminal: api.Terminal
    asked: int = 0
    none: int = 0

    def ask(self, name: str, call: Callable[[], T | None]) -> T:
        """``call`` until it answers (not None); counts both. Raises ProbeQueryFailed."""
        for _ in range(ATTEMPTS):
            self.asked += 1
            answer = call()
            if answer is not None:
                return answer
            self.none += 1
            time.sleep(PAUSE_SECONDS)
        code, message = self.terminal.last_error()
        raise ProbeQueryFailed(f"{name} answered None {ATTEMPTS} times: {code} {message}")

    def positions(self, **filters: int | str) -> tuple[api.TradePosition, ...]:
        return self.ask("positions_get", lambda: self.terminal.positions_get(**filters))  # type: ignore[arg-type]

    def deals_of(self, order: int) -> tuple[api.TradeDeal, ...]:
        return self.ask("history_deals_get", lambda: self.terminal.history_deals_get(ticket=order))

    def history_order(self, order: int) -> tuple[api.TradeOrder, ...]:
        return self.ask(
            "history_orders_get", lambda: self.terminal.history_orders_get(ticket=order)
        )
