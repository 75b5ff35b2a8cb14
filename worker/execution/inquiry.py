"""The terminal calls of settling one execution: what the broker knows of it, gathered into
the typed reports of :mod:`worker.execution.settle` (which decides from them). The settler
reads whole accounts at once (``Gateway.window``); these serve the background recheck of
UNKNOWN rows and deals the window misses."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from worker.execution.audit import Run
from worker.execution.plan import Plan
from worker.execution.settle import Deal, Found, Order
from worker.mt5.gateway import Gateway

RECONCILE_PADDING = timedelta(minutes=5)


def reconcile(
    gateway: Gateway, plan: Plan, grace_seconds: float, sleep: Callable[[float], None]
) -> Found:
    """Our orders, deals and positions (comment token and magic). Nothing found is asked
    again after ``grace_seconds``, for a terminal still processing the order. Raises what
    the gateway raises (GatewayRejection, TransportError): the caller keeps it in flight."""
    since = plan.received_at - RECONCILE_PADDING
    found = gateway.reconcile(plan.identity, plan.broker_symbol, since)
    if not found.found and grace_seconds > 0:
        sleep(grace_seconds)
        found = gateway.reconcile(plan.identity, plan.broker_symbol, since)
    return Found.of(found)


def deals_of_orders(gateway: Gateway, orders: Iterable[Order], run: Run) -> tuple[Deal, ...]:
    """The deals of each order, asked by ticket (the deals window can lag or miss them)."""
    deals = tuple(
        Deal.of(deal) for order in orders for deal in gateway.deals_for_order(order.ticket)
    )
    run.broker_calls("reconcile", gateway.drain_calls())
    return deals
