"""The simulated broker's book: open and historical orders, deals, positions, ticket counters.

Indexes serve the lookups the real terminal offers (by ticket, by position, by time window)
and every mutation is written to the state file when there is one (``SimStore``).
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Iterable
from typing import Any

from worker.mt5 import api
from worker.mt5.sim.clock import server_seconds
from worker.mt5.sim.state import (
    DealRecord,
    LateOrder,
    LoadedState,
    OrderRecord,
    PositionRecord,
    SimStore,
)

OPEN_STATES = (api.ORDER_STATE_STARTED, api.ORDER_STATE_PLACED, api.ORDER_STATE_PARTIAL)


def group_matches(name: str, group: str | None) -> bool:
    """MT5 group filters: comma-separated wildcards, ``!`` excludes (``"*USD*,!EUR*"``)."""
    if not group:
        return True
    included = False
    for raw in group.split(","):
        pattern = raw.strip()
        if pattern.startswith("!"):
            if fnmatch.fnmatchcase(name, pattern[1:]):
                return False
        elif fnmatch.fnmatchcase(name, pattern):
            included = True
    return included


def time_window(
    date_from: api.DateLike, date_to: api.DateLike, times: list[int]
) -> tuple[int, int]:
    """Slice bounds of the sorted server-ms ``times`` inside [date_from, date_to] (seconds)."""
    start = server_seconds(date_from) * 1000
    end = server_seconds(date_to) * 1000 + 999
    return bisect.bisect_left(times, start), bisect.bisect_right(times, end)


class Book:
    """Orders, deals and positions with their indexes; persisted through ``store``."""

    def __init__(self, store: SimStore | None) -> None:
        self.store = store
        self.next_order = 50_000_001
        self.next_deal = 40_000_001
        self.next_request = 1
        self.next_position = 60_000_001  # hedging tickets that differ from the identifier
        self.hidden_deals: dict[int, float] = {}  # deal ticket -> UTC second it shows up
        self.orders: dict[int, OrderRecord] = {}
        self.open_orders: dict[int, OrderRecord] = {}
        self.pending_fills: dict[int, float] = {}  # RETURN orders on exchange: ticket -> due
        # orders taken with an unknown outcome that execute later: request id -> order
        self.late_orders: dict[int, LateOrder] = {}
        self.history_orders: list[OrderRecord] = []
        self.history_order_times: list[int] = []
        self.orders_by_position: dict[int, list[OrderRecord]] = {}
        self.deals: list[DealRecord] = []
        self.deal_times: list[int] = []
        self.deals_by_order: dict[int, list[DealRecord]] = {}
        self.deals_by_position: dict[int, list[DealRecord]] = {}
        self.positions: dict[int, PositionRecord] = {}
        self.by_symbol: dict[str, dict[int, PositionRecord]] = {}
        self.netting: dict[str, int] = {}  # symbol -> position ticket (netting accounts)

    # ------------------------------------------------------------------ mutations
    def add_deal(self, deal: DealRecord) -> None:
        # server time falls back an hour when a DST-following offset does: keep time order
        index = bisect.bisect_right(self.deal_times, deal.time_msc)
        self.deals.insert(index, deal)
        self.deal_times.insert(index, deal.time_msc)
        self.deals_by_order.setdefault(deal.order, []).append(deal)
        self.deals_by_position.setdefault(deal.position_id, []).append(deal)

    def save_deal(self, deal: DealRecord) -> None:
        if self.store is not None:
            self.store.put_deal(deal)

    def add_position(self, position: PositionRecord) -> None:
        self.positions[position.ticket] = position
        self.by_symbol.setdefault(position.symbol, {})[position.ticket] = position

    def drop_position(self, ticket: int) -> None:
        position = self.positions.pop(ticket, None)
        if position is not None:
            self.by_symbol.get(position.symbol, {}).pop(ticket, None)
        if self.store is not None:
            self.store.delete_position(ticket)

    def save_position(self, position: PositionRecord) -> None:
        if self.store is not None:
            self.store.put_position(position)

    def save_order(self, order: OrderRecord) -> None:
        if self.store is not None:
            self.store.put_order(order)

    def place(self, order: OrderRecord, due: float) -> None:
        """A RETURN order waiting on the exchange until ``due`` (UTC seconds)."""
        self.orders[order.ticket] = order
        self.open_orders[order.ticket] = order
        self.pending_fills[order.ticket] = due
        self.save_order(order)

    def hold_late(self, late: LateOrder) -> None:
        """An order that executes at ``late.due``; nothing of it shows until then."""
        self.late_orders[late.request_id] = late
        if self.store is not None:
            self.store.put_late(late)

    def drop_late(self, request_id: int) -> None:
        """A late order executed (or refused at its execution): no longer waiting."""
        self.late_orders.pop(request_id, None)
        if self.store is not None:
            self.store.delete_late(request_id)

    def finish_order(self, order: OrderRecord, state: int | None, now: int) -> None:
        """Move a filled/cancelled order into history."""
        order.finish(state if state is not None else api.ORDER_STATE_FILLED, now)
        self.orders[order.ticket] = order
        self.open_orders.pop(order.ticket, None)
        self.pending_fills.pop(order.ticket, None)
        index = bisect.bisect_right(self.history_order_times, now)
        self.history_orders.insert(index, order)
        self.history_order_times.insert(index, now)
        if order.position_id:
            self.orders_by_position.setdefault(order.position_id, []).append(order)
        self.save_order(order)

    def hide_deal(self, ticket: int, until: float) -> None:
        """The deal stays out of ``history_deals_get`` until ``until`` (UTC seconds)."""
        self.hidden_deals[ticket] = until

    def reveal_deals(self, now: float) -> None:
        for ticket, until in list(self.hidden_deals.items()):
            if until <= now:
                del self.hidden_deals[ticket]

    def save_meta(self, balance: float, last_stamp: int, last_utc_ms: int) -> None:
        if self.store is not None:
            self.store.put_meta(
                "state",
                {
                    "balance": balance,
                    "next_order": self.next_order,
                    "next_deal": self.next_deal,
                    "next_request": self.next_request,
                    "next_position": self.next_position,
                    "last_stamp": last_stamp,
                    "last_utc_ms": last_utc_ms,
                },
            )

    def commit(self) -> None:
        if self.store is not None:
            self.store.commit()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def load(self, loaded: LoadedState, now: float, hedging: bool) -> dict[str, Any] | None:
        """Rebuild the book from a state file; returns its saved counters and balance."""
        state: dict[str, Any] | None = loaded.meta.get("state")
        if state is not None:
            self.next_order = int(state["next_order"])
            self.next_deal = int(state["next_deal"])
            self.next_request = int(state["next_request"])
            self.next_position = int(state.get("next_position", self.next_position))
        for deal in loaded.deals:
            self.add_deal(deal)
        history: list[OrderRecord] = []
        for order in loaded.orders:
            self.orders[order.ticket] = order
            if order.state in OPEN_STATES and not order.time_done_msc:
                self.open_orders[order.ticket] = order
                self.pending_fills[order.ticket] = now
                continue
            history.append(order)
            if order.position_id:
                self.orders_by_position.setdefault(order.position_id, []).append(order)
        history.sort(key=lambda o: (o.time_done_msc, o.ticket))
        self.history_orders = history
        self.history_order_times = [o.time_done_msc for o in history]
        for position in loaded.positions:
            self.add_position(position)
            if not hedging:
                self.netting[position.symbol] = position.ticket
        for late in loaded.late:  # they execute when due, on this run's clock
            self.late_orders[late.request_id] = late
        return state

    # ------------------------------------------------------------------ lookups
    def find_open_orders(
        self, symbol: str | None, group: str | None, ticket: int | None
    ) -> list[OrderRecord]:
        orders: Iterable[OrderRecord] = self.open_orders.values()
        if ticket is not None:
            found = self.open_orders.get(ticket)
            orders = () if found is None else (found,)
        return [
            o
            for o in orders
            if (symbol is None or o.symbol == symbol) and group_matches(o.symbol, group)
        ]

    def find_positions(
        self, symbol: str | None, group: str | None, ticket: int | None
    ) -> list[PositionRecord]:
        positions: Iterable[PositionRecord] = self.positions.values()
        if ticket is not None:
            found = self.positions.get(ticket)
            positions = () if found is None else (found,)
        elif symbol is not None:
            positions = self.by_symbol.get(symbol, {}).values()
        return [
            p
            for p in sorted(positions, key=lambda p: p.ticket)
            if (symbol is None or p.symbol == symbol) and group_matches(p.symbol, group)
        ]

    def find_history_orders(
        self,
        date_from: api.DateLike | None,
        date_to: api.DateLike | None,
        ticket: int | None,
        position: int | None,
    ) -> Iterable[OrderRecord] | None:
        """By ``ticket`` or ``position``, else those done in the window (None: no window)."""
        if ticket is not None:
            found = self.orders.get(ticket)
            return () if found is None or ticket in self.open_orders else (found,)
        if position is not None:
            return self.orders_by_position.get(position, ())
        if date_from is None or date_to is None:
            return None
        start, end = time_window(date_from, date_to, self.history_order_times)
        return self.history_orders[start:end]

    def find_deals(
        self,
        date_from: api.DateLike | None,
        date_to: api.DateLike | None,
        ticket: int | None,
        position: int | None,
    ) -> Iterable[DealRecord] | None:
        """By ORDER ``ticket``, by ``position`` id, else those in the window (None: no window).

        Deals still hidden (``hide_deal``) are left out."""
        found: Iterable[DealRecord]
        if ticket is not None:
            found = self.deals_by_order.get(ticket, ())
        elif position is not None:
            found = self.deals_by_position.get(position, ())
        elif date_from is None or date_to is None:
            return None
        else:
            start, end = time_window(date_from, date_to, self.deal_times)
            found = self.deals[start:end]
        hidden = self.hidden_deals
        return [d for d in found if d.ticket not in hidden] if hidden else found
