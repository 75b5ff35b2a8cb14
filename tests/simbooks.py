"""The simulated broker's own books, for asserting what the broker really did.

A test compares the worker against the broker's truth, not against what one terminal query
happens to show: ``history_deals_get`` hides deals for ``deal_lag_ms`` and answers None at
``query_none_rate`` on the (default) hardened simulator.
"""

from __future__ import annotations

from worker.mt5 import api
from worker.mt5.sim.state import PositionRecord
from worker.mt5.sim.terminal import SimTerminal


def broker_deals(sim: SimTerminal, magic: int | None = None) -> list[api.TradeDeal]:
    """Every deal the simulator booked (also those still lagging), oldest first; only those
    of ``magic`` when given."""
    with sim._lock:  # the books have no public reader that bypasses the injected faults
        deals = [deal.to_api() for deal in sim._book.deals]
    return [deal for deal in deals if magic is None or deal.magic == magic]


def broker_positions(sim: SimTerminal, symbol: str | None = None) -> list[PositionRecord]:
    """Every open position on the simulator's books (no query to fail), of ``symbol``."""
    with sim._lock:
        positions = list(sim._book.positions.values())
    return [p for p in positions if symbol is None or p.symbol == symbol]
