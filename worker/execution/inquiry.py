"""The terminal calls of settling: what the broker knows of an execution, gathered into the
typed reports of :mod:`worker.execution.settle` (which decides from them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta

from worker.execution import settle
from worker.execution.audit import Run
from worker.execution.plan import Plan
from worker.execution.settle import Deal, Fill, Found, Order
from worker.execution.submit import MONITOR_FIRST_POLL_SECONDS, MONITOR_MAX_POLL_SECONDS
from worker.mt5 import api
from worker.mt5.gateway import Gateway, QueryFailed

RECONCILE_PADDING = timedelta(minutes=5)


def reconcile(
    gateway: Gateway, plan: Plan, grace_seconds: float, sleep: Callable[[float], None]
) -> Found:
    """Our orders, deals and positions (comment token and magic). Nothing found is asked
    again after ``grace_seconds``, for a terminal still processing the order. Raises what
    the gateway raises (GatewayRejection, TransportError): the caller keeps it in flight."""
    since = plan.received_at - RECONCILE_PADDING
    found = gateway.reconcile(plan.token, plan.broker_symbol, since)
    if not found.found and grace_seconds > 0:
        sleep(grace_seconds)
        found = gateway.reconcile(plan.token, plan.broker_symbol, since)
    return Found.of(found)


def deals_of_orders(gateway: Gateway, orders: Iterable[Order], run: Run) -> tuple[Deal, ...]:
    """The deals of each order, asked by ticket (the deals window can lag or miss them)."""
    deals = tuple(
        Deal.of(deal) for order in orders for deal in gateway.deals_for_order(order.ticket)
    )
    run.broker_calls("reconcile", gateway.drain_calls())
    return deals


def shown_fills(gateway: Gateway, plan: Plan, found: Found, run: Run) -> list[Fill] | None:
    """Our fills as the broker shows them: the deals window, completed by deals asked by
    order ticket. None: our order shows but not (all) its deals yet."""
    window = settle.fills_from_deals(found.deals, plan.side, plan.requested_price)
    ask = settle.orders_to_ask(found, window, plan.side)
    asked = deals_of_orders(gateway, ask, run) if ask else ()
    return settle.fills_with_asked(found, window, asked, plan.side, plan.requested_price)


def until_deals_show(
    gateway: Gateway,
    plan: Plan,
    found: Found,
    run: Run,
    *,
    timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> tuple[Found, list[Fill]]:
    """The broker's view once our executed orders show their deals, asked again (the
    whole reconcile) for at most ``timeout`` seconds; after that the execution stays in
    flight (TransportError). A view that loses the execution again, or a failed query, is
    not settled on."""
    deadline = clock() + timeout
    delay = MONITOR_FIRST_POLL_SECONDS
    shown = _shown_or_none(gateway, plan, found, run)
    while shown is None:
        if clock() >= deadline:
            raise api.TransportError("the broker shows our order but not yet its deals")
        sleep(delay)
        delay = min(delay * 2, MONITOR_MAX_POLL_SECONDS)
        try:
            with run.stage("reconcile"):
                found = reconcile(gateway, plan, 0.0, sleep)
        except QueryFailed:  # the connection is up: ask again
            run.broker_calls("reconcile", gateway.drain_calls())
            continue
        run.broker_calls("reconcile", gateway.drain_calls())
        shown = _shown_or_none(gateway, plan, found, run) if found.found else None
    return found, shown


def _shown_or_none(gateway: Gateway, plan: Plan, found: Found, run: Run) -> list[Fill] | None:
    try:
        return shown_fills(gateway, plan, found, run)
    except QueryFailed:
        run.broker_calls("reconcile", gateway.drain_calls())
        return None
