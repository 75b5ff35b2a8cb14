"""The simulated broker's own books, for asserting what the broker really did.

A test compares the worker against the broker's truth, not against what one terminal query
happens to show: ``history_deals_get`` hides deals for ``deal_lag_ms`` and answers None at
``query_none_rate`` on the (default) hardened simulator.
"""

from __future__ import annotations

from worker.mt5 import api
from worker.mt5.sim.terminal import SimTerminal


def broker_deals(sim: SimTerminal, magic: int | None = None) -> list[api.TradeDeal]:
    """Every deal the simulator booked (also those still lagging), oldest first; only those
    of ``magic`` when given."""
    with sim._lock:  # the books have no public reader that bypasses the injected faults
        deals = [deal.to_api() for deal in sim._book.deals]
    return [deal for deal in deals if magic is None or deal.magic == magic]
