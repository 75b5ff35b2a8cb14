"""Finding our orders, deals and positions on the terminal (rule: ``identity`` module).

Every query here tells a failed answer (None, ``last_error`` set) from an empty one: a
failure raises :class:`QueryFailed`, never reads as "not found" (a resend, or opening
instead of closing, would follow).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TypeVar

from worker.mt5 import api
from worker.mt5.gateway.calls import Calls
from worker.mt5.gateway.identity import OrderIdentity, is_deployment_magic
from worker.mt5.gateway.model import Reconciliation, Side, SymbolSpec

# Server clocks move with DST and brokers' zones are not UTC: the history window is padded
# by a day on both sides (the magic/comment filter keeps a wide window cheap).
RECONCILE_PAD = timedelta(days=1)
UNKNOWN_OFFSET_PAD = timedelta(hours=14)  # extra, when the server's offset is not known
# The settler's window of the account's history, once the server's offset is known from a
# fresh tick: the orders it looks for were sent after ``since`` (on the worker's clock),
# so it only needs room for the two clocks' disagreement and the time-stamps' seconds.
WINDOW_PAD = timedelta(seconds=30)


def _window(
    since: datetime, now_utc: datetime, offset_ms: int | None, known_pad: timedelta = RECONCILE_PAD
) -> tuple[int, int]:
    """The history window in server time, padded by ``known_pad`` when the server's offset
    is known (see RECONCILE_PAD), and by far more when it is not."""
    pad = known_pad if offset_ms is not None else RECONCILE_PAD + UNKNOWN_OFFSET_PAD
    since_utc = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
    shift = timedelta(milliseconds=offset_ms or 0)
    return int((since_utc + shift - pad).timestamp()), int((now_utc + shift + pad).timestamp())


_Item = TypeVar("_Item", api.TradeOrder, api.TradeDeal)


@dataclass(frozen=True)
class HistoryWindow:
    """One account's orders and deals of this deployment over a window (see ``window``)."""

    open_orders: tuple[api.TradeOrder, ...]
    history_orders: tuple[api.TradeOrder, ...]
    deals: tuple[api.TradeDeal, ...]

    def of(self, identity: OrderIdentity, broker_symbol: str) -> Reconciliation:
        """One execution's part of the window (no positions: the window has none)."""

        def ours(item: api.TradeOrder | api.TradeDeal) -> bool:
            return item.symbol == broker_symbol and identity.matches(item.magic, item.comment)

        magic = identity.magic
        return Reconciliation(
            open_orders=tuple(o for o in self._open_by_magic.get(magic, ()) if ours(o)),
            history_orders=tuple(o for o in self._history_by_magic.get(magic, ()) if ours(o)),
            deals=tuple(d for d in self._deals_by_magic.get(magic, ()) if ours(d)),
            positions=(),
        )

    # By magic (one execution's): a round asks the window for each of its executions,
    # hundreds at a high rate, and a scan of the whole window for each made rounds quadratic.
    @cached_property
    def _open_by_magic(self) -> dict[int, list[api.TradeOrder]]:
        return _by_magic(self.open_orders)

    @cached_property
    def _history_by_magic(self) -> dict[int, list[api.TradeOrder]]:
        return _by_magic(self.history_orders)

    @cached_property
    def _deals_by_magic(self) -> dict[int, list[api.TradeDeal]]:
        return _by_magic(self.deals)


def _by_magic(items: tuple[_Item, ...]) -> dict[int, list[_Item]]:
    grouped: dict[int, list[_Item]] = {}
    for item in items:
        grouped.setdefault(item.magic, []).append(item)
    return grouped


class History:
    """Order, deal and position queries of one gateway."""

    def __init__(self, calls: Calls, terminal: api.Terminal) -> None:
        self._calls = calls
        self._terminal = terminal

    def order_state(self, order_ticket: int) -> api.TradeOrder | None:
        """The order, open or in history (None when the terminal does not know it)."""
        open_orders = self._calls.require(
            "orders_get", lambda: self._terminal.orders_get(ticket=order_ticket)
        )
        if open_orders:
            return open_orders[0]
        history = self._calls.require(
            "history_orders_get", lambda: self._terminal.history_orders_get(ticket=order_ticket)
        )
        return history[0] if history else None

    def deals_for_order(self, order_ticket: int) -> tuple[api.TradeDeal, ...]:
        deals = self._calls.require(
            "history_deals_get", lambda: self._terminal.history_deals_get(ticket=order_ticket)
        )
        return tuple(deals)

    def reconcile(
        self,
        identity: OrderIdentity,
        broker_symbol: str,
        since: datetime,
        *,
        now_utc: datetime,
        offset_ms: int | None,
    ) -> Reconciliation:
        """Everything of ``identity`` on ``broker_symbol`` since ``since`` (UTC)."""
        date_from, date_to = _window(since, now_utc, offset_ms)

        def ours(item: api.TradeOrder | api.TradeDeal | api.TradePosition) -> bool:
            return item.symbol == broker_symbol and identity.matches(item.magic, item.comment)

        open_orders = self._calls.require(
            "orders_get", lambda: self._terminal.orders_get(symbol=broker_symbol)
        )
        positions = self._calls.require(
            "positions_get", lambda: self._terminal.positions_get(symbol=broker_symbol)
        )
        history_orders, deals = self._between(date_from, date_to)
        return Reconciliation(
            open_orders=tuple(o for o in open_orders if ours(o)),
            history_orders=tuple(o for o in history_orders if ours(o)),
            deals=tuple(d for d in deals if ours(d)),
            positions=tuple(p for p in positions if ours(p)),
        )

    def window(
        self,
        since: datetime,
        deployment_magic: int,
        *,
        now_utc: datetime,
        offset_ms: int | None,
    ) -> HistoryWindow:
        """The account's open orders and its history orders and deals since ``since`` (UTC),
        this deployment's only: three queries, whatever the number of executions they serve
        (the settler asks once per account and round). The window is as narrow as a known
        server offset allows (``WINDOW_PAD``): every deal in it crosses the connection."""
        date_from, date_to = _window(since, now_utc, offset_ms, WINDOW_PAD)

        def ours(item: api.TradeOrder | api.TradeDeal) -> bool:
            return is_deployment_magic(item.magic, deployment_magic)

        open_orders = self._calls.require("orders_get", self._terminal.orders_get)
        history_orders, deals = self._between(date_from, date_to)
        return HistoryWindow(
            open_orders=tuple(o for o in open_orders if ours(o)),
            history_orders=tuple(o for o in history_orders if ours(o)),
            deals=tuple(d for d in deals if ours(d)),
        )

    def _between(
        self, date_from: int, date_to: int
    ) -> tuple[tuple[api.TradeOrder, ...], tuple[api.TradeDeal, ...]]:
        """History orders and deals of the window (server time, seconds)."""
        history_orders = self._calls.require(
            "history_orders_get",
            lambda: self._terminal.history_orders_get(date_from, date_to),
        )
        deals = self._calls.require(
            "history_deals_get", lambda: self._terminal.history_deals_get(date_from, date_to)
        )
        return tuple(history_orders), tuple(deals)

    def positions(self, symbol: str) -> tuple[api.TradePosition, ...]:
        return tuple(
            self._calls.require(
                "positions_get", lambda: self._terminal.positions_get(symbol=symbol)
            )
        )

    def opposite_positions(
        self, spec: SymbolSpec, side: Side, deployment_magic: int
    ) -> tuple[api.TradePosition, ...]:
        """This deployment's positions on the other side of ``side``, oldest first by ticket."""
        opposite = side.opposite.position_type
        return tuple(
            sorted(
                (
                    p
                    for p in self.positions(spec.name)
                    if p.type == opposite
                    and p.symbol == spec.name
                    and is_deployment_magic(p.magic, deployment_magic)
                ),
                key=lambda p: p.ticket,
            )
        )
