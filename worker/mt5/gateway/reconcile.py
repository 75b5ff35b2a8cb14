"""Finding our orders, deals and positions on the terminal (comment token AND magic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.mt5 import api
from worker.mt5.gateway.calls import Calls
from worker.mt5.gateway.model import Reconciliation, Side, SymbolSpec

RECONCILE_PAD = timedelta(minutes=10)


class History:
    """Order, deal and position queries of one gateway."""

    def __init__(self, calls: Calls, terminal: api.Terminal) -> None:
        self._calls = calls
        self._terminal = terminal

    def order_state(self, order_ticket: int) -> api.TradeOrder | None:
        """The order, open or in history (None when the terminal does not know it)."""
        open_orders, _ = self._calls.query(
            "orders_get", lambda: self._terminal.orders_get(ticket=order_ticket)
        )
        if open_orders:
            return open_orders[0]
        history, _ = self._calls.query(
            "history_orders_get", lambda: self._terminal.history_orders_get(ticket=order_ticket)
        )
        return history[0] if history else None

    def deals_for_order(self, order_ticket: int) -> tuple[api.TradeDeal, ...]:
        deals, _ = self._calls.query(
            "history_deals_get", lambda: self._terminal.history_deals_get(ticket=order_ticket)
        )
        return tuple(deals or ())

    def reconcile(
        self,
        comment_token: str,
        magic: int,
        broker_symbol: str,
        since: datetime,
        *,
        now_utc: datetime,
        offset_ms: int | None,
    ) -> Reconciliation:
        """Everything with this comment token AND magic on ``broker_symbol`` since ``since``."""
        pad = RECONCILE_PAD if offset_ms is not None else RECONCILE_PAD + timedelta(hours=14)
        since_utc = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        shift = timedelta(milliseconds=offset_ms or 0)
        date_from = int((since_utc + shift - pad).timestamp())
        date_to = int((now_utc + shift + pad).timestamp())

        def ours(item: api.TradeOrder | api.TradeDeal | api.TradePosition) -> bool:
            return (
                item.comment == comment_token
                and item.magic == magic
                and item.symbol == broker_symbol
            )

        open_orders, _ = self._calls.query(
            "orders_get", lambda: self._terminal.orders_get(symbol=broker_symbol)
        )
        positions, _ = self._calls.query(
            "positions_get", lambda: self._terminal.positions_get(symbol=broker_symbol)
        )
        history_orders, _ = self._calls.query(
            "history_orders_get",
            lambda: self._terminal.history_orders_get(date_from, date_to),
        )
        deals, _ = self._calls.query(
            "history_deals_get", lambda: self._terminal.history_deals_get(date_from, date_to)
        )
        return Reconciliation(
            open_orders=tuple(o for o in open_orders or () if ours(o)),
            history_orders=tuple(o for o in history_orders or () if ours(o)),
            deals=tuple(d for d in deals or () if ours(d)),
            positions=tuple(p for p in positions or () if ours(p)),
        )

    def opposite_positions(
        self, spec: SymbolSpec, side: Side, magic: int
    ) -> tuple[api.TradePosition, ...]:
        """Our (magic) positions on the other side of ``side``, oldest first by ticket."""
        positions, _ = self._calls.query(
            "positions_get", lambda: self._terminal.positions_get(symbol=spec.name)
        )
        opposite = side.opposite.position_type
        return tuple(
            sorted(
                (
                    p
                    for p in positions or ()
                    if p.type == opposite and p.magic == magic and p.symbol == spec.name
                ),
                key=lambda p: p.ticket,
            )
        )
