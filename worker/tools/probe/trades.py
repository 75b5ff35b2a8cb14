"""Round trips of the minimum volume: open, watch the history, close, verify closed.

Each round trip is timed on this process's monotonic clock from the moment ``order_send``
answered: the deal and the history order are polled together, and each appearance is
dated at the midpoint between the poll that missed it and the one that saw it (so the poll
interval adds no bias, only spread).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.errors import WorkerError
from worker.mt5 import api
from worker.tools.probe.magic import probe_comment, probe_magic
from worker.tools.probe.orders import close_request, done, market_request
from worker.tools.probe.queries import Queries
from worker.tools.probe.stats import midpoint_ms

POLL_SECONDS = 0.004


class ProbeTradeError(WorkerError):
    """An order of the probe was refused or its outcome is unknown (message: retcode)."""


@dataclass(frozen=True)
class Reply:
    latency_ms: float
    deal_zero: bool
    deal_lag_ms: float | None  # None: not seen within the wait
    order_lag_ms: float | None


@dataclass(frozen=True)
class RoundTrip:
    comment_sent: str
    comment_order: str | None  # None: not seen within the wait
    comment_deal: str | None
    comment_position: str | None
    magic_kept: bool
    position_ticket_differs: bool | None
    replies: tuple[Reply, ...]


@dataclass
class Trader:
    terminal: api.Terminal
    queries: Queries
    symbol: api.SymbolInfo
    filling: int
    hedging: bool
    run: int
    wait_seconds: float = 10.0
    sleep: Callable[[float], None] = time.sleep
    opened: list[int] = field(default_factory=list)  # position tickets not yet verified closed

    def _send(self, request: dict[str, Any]) -> tuple[api.OrderSendResult, float]:
        started = time.perf_counter()
        result = self.terminal.order_send(request)
        latency = (time.perf_counter() - started) * 1000.0
        if not done(result):
            code = result.retcode if result is not None else self.terminal.last_error()
            raise ProbeTradeError(f"order_send on {self.symbol.name} answered {code}")
        assert result is not None
        return result, latency

    def _watch(
        self, result: api.OrderSendResult
    ) -> tuple[float | None, float | None, tuple[api.TradeDeal, ...], tuple[api.TradeOrder, ...]]:
        """(deal lag ms, order lag ms, deals, history order) of a reply."""
        start = time.perf_counter()
        last_miss = 0.0
        deal_lag: float | None = None
        order_lag: float | None = None
        deals: tuple[api.TradeDeal, ...] = ()
        orders: tuple[api.TradeOrder, ...] = ()
        while deal_lag is None or order_lag is None:
            if deal_lag is None:
                deals = self.queries.deals_of(result.order)
            if order_lag is None:
                orders = self.queries.history_order(result.order)
            now = (time.perf_counter() - start) * 1000.0
            if deal_lag is None and deals:
                deal_lag = midpoint_ms(last_miss, now)
            if order_lag is None and orders:
                order_lag = midpoint_ms(last_miss, now)
            last_miss = now
            if now > self.wait_seconds * 1000.0:
                break
            if deal_lag is None or order_lag is None:
                self.sleep(POLL_SECONDS)
        return deal_lag, order_lag, deals, orders

    def _price(self, buy: bool) -> float:
        tick = self.terminal.symbol_info_tick(self.symbol.name)
        if tick is None:
            raise ProbeTradeError(f"no tick for {self.symbol.name}")
        return tick.ask if buy else tick.bid

    def _position(self, magic: int) -> api.TradePosition | None:
        for _ in range(int(self.wait_seconds / POLL_SECONDS / 10) + 1):
            found = [p for p in self.queries.positions(symbol=self.symbol.name) if p.magic == magic]
            if found:
                return found[0]
            self.sleep(POLL_SECONDS * 10)
        return None

    def round_trip(self, sequence: int) -> RoundTrip:
        magic = probe_magic(self.run, sequence)
        comment = probe_comment(self.run, sequence)
        request = market_request(
            self.symbol.name,
            self.symbol.volume_min,
            buy=True,
            price=self._price(True),
            magic=magic,
            comment=comment,
            filling=self.filling,
        )
        opened, latency = self._send(request)
        deal_lag, order_lag, deals, orders = self._watch(opened)
        position = self._position(magic)
        if position is None:
            raise ProbeTradeError(f"the position of order {opened.order} did not show")
        self.opened.append(position.ticket)
        replies = [Reply(latency, opened.deal == 0, deal_lag, order_lag)]
        closing = close_request(position, self._price(False), self.filling, comment)
        closed, latency = self._send(closing)
        close_deal_lag, close_order_lag, _, _ = self._watch(closed)
        replies.append(Reply(latency, closed.deal == 0, close_deal_lag, close_order_lag))
        verify_closed(self.queries, position.ticket, self.sleep, self.wait_seconds)
        self.opened.remove(position.ticket)
        magics = [d.magic for d in deals] + [o.magic for o in orders] + [position.magic]
        return RoundTrip(
            comment_sent=comment,
            comment_order=orders[0].comment if orders else None,
            comment_deal=deals[0].comment if deals else None,
            comment_position=position.comment,
            magic_kept=all(m == magic for m in magics),
            position_ticket_differs=(position.ticket != opened.order) if self.hedging else None,
            replies=tuple(replies),
        )


def verify_closed(
    queries: Queries, ticket: int, sleep: Callable[[float], None], wait_seconds: float
) -> None:
    """The position is gone from ``positions_get`` (an empty answer, never None)."""
    for _ in range(int(wait_seconds / (POLL_SECONDS * 10)) + 1):
        if not queries.positions(ticket=ticket):
            return
        sleep(POLL_SECONDS * 10)
    raise ProbeTradeError(f"position {ticket} is still open after its close")
