"""Sending: the intent row committed before any order, the legs sent, placed (10008) orders
monitored until final, and the orders of the slippage close.

Every terminal call is drained into the run's audit after its stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from schemas.request import ExecutionRequest
from worker.config import Settings
from worker.execution.audit import Run
from worker.execution.plan import Plan, plan_snapshot, request_snapshot
from worker.execution.settle import (
    FINAL_ORDER_STATES,
    Close,
    Deal,
    Fill,
    Order,
    closes_left,
    deals_visible,
    executed_by,
    fill_of_order,
    fill_of_reply,
)
from worker.mt5 import api
from worker.mt5.gateway import Gateway, GatewayRejection, QueryFailed, SendOutcome, SymbolSpec
from worker.observability import metrics
from worker.pool.leases import Lease, LeaseLost
from worker.store.store import Event, LockHeld, LockNotHeld, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

MONITOR_FIRST_POLL_SECONDS = 0.01
MONITOR_MAX_POLL_SECONDS = 0.5


@dataclass
class Sent:
    """What sending a plan's legs came to.

    ``fills``: confirmed by replies that named their deal. ``orders``: taken by the server
    (a done reply without its deal, a placed order) with fills still to read from the
    deals. ``unknown``: the last leg's outcome is unknown. ``refused``: the gateway sent
    nothing for a leg (no quote, no filling mode). ``rejected``: the broker refused a leg
    for good. An unknown, refused or rejected leg stops the remaining legs.
    """

    fills: list[Fill] = field(default_factory=list)
    orders: list[int] = field(default_factory=list)
    requested: list[tuple[int, float]] = field(default_factory=list)  # orders' send prices
    legs_sent: int = 0
    unknown: bool = False
    refused: GatewayRejection | None = None
    rejected: SendOutcome | None = None

    @property
    def waits(self) -> bool:
        """The fills are not all known: the settler finishes the execution."""
        return bool(self.orders) or self.unknown


@contextmanager
def fenced_by(lease: Lease) -> Iterator[LockHeld]:
    """The lease's lock, for a write that must commit only while the lease holds it; the
    store's LockNotHeld becomes LeaseLost inside the lease's ``with`` (its connection is
    then discarded, and the delivery requeued: the row stays as it was for its holder)."""
    try:
        yield LockHeld(*lease.lock_holder())
    except LockNotHeld as lost:
        raise LeaseLost(str(lost)) from None


def intent_fields(
    plan: Plan, request: ExecutionRequest, lease: Lease, run: Run, magic: int
) -> dict[str, Any]:
    """The SUBMITTING row committed before the first order is sent."""
    return {
        "execution_id": plan.execution_id,
        "idempotency_key": plan.idempotency_key,
        "rpm_order_id": plan.rpm_order_id,
        "state": "SUBMITTING",
        "symbol": plan.symbol,
        "broker_symbol": plan.broker_symbol,
        "direction": plan.side.value,
        "intended_units": plan.intended_units,
        "intended_lots": plan.intended_lots,
        "requested_price": plan.requested_price,
        "spread_pips": plan.spread_pips,
        "deviation_points": plan.deviation,
        "comment_token": plan.token,
        "magic": magic,
        "session_id": lease.session.id,
        "session_key": lease.session.spec.identity,  # resumed by it (SessionPool.claim)
        "account_login": lease.session.login,
        "account": lease.session.spec.account,
        "request": plan_snapshot(plan, request_snapshot(request)),
        "decided_at": plan.decided_at,
        "received_at": plan.received_at,
        "submitted_at": run.submitted_at,
        "arrival_bid": plan.arrival_bid,
        "arrival_ask": plan.arrival_ask,
    }


class Sender:
    """Sends a plan's orders on a leased session and watches them (state per call)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.sleep = sleep

    def commit_intent(self, plan: Plan, request: ExecutionRequest, lease: Lease, run: Run) -> bool:
        """Commit the intent row. False: the key already has a row (nothing is sent)."""
        run.submitted_at = datetime.now(UTC)
        with run.stage("intent"):
            run.event("intent", "SUBMITTING", legs=len(plan.legs), lots=plan.intended_lots)
            fields = intent_fields(plan, request, lease, run, plan.magic)
            with fenced_by(lease) as lock:
                return self.store.insert_intent(lease.conn, fields, run.take_events(), lock=lock)

    def send(self, plan: Plan, spec: SymbolSpec, lease: Lease, run: Run) -> Sent:
        """Send the legs in order. Nothing waits on the broker's history here: a reply that
        names its deal is the fill; any other order the server took is left to the settler.
        An order whose outcome may have reached the server is never sent again."""
        gateway: Gateway = lease.session.gateway
        run.submissions += 1
        sent = Sent()
        for leg in plan.legs:
            try:
                with run.stage("submit"):
                    reply = gateway.send(
                        spec,
                        plan.side,
                        leg.lots,
                        identity=plan.identity,
                        fence=lease.fence,
                        deviation=plan.deviation,
                        position=leg.position,
                    )
            except GatewayRejection as refused:
                # nothing was sent for this leg (no quote, no filling mode)
                run.broker_calls("submit", gateway.drain_calls())
                sent.refused = refused
                return sent
            run.broker_calls("submit", gateway.drain_calls())
            sent.legs_sent += 1
            run.attempts += reply.attempts
            run.retcode = reply.retcode
            run.broker_comment = reply.comment
            run.filling_mode = reply.filling_mode
            if reply.attempts > 1:
                metrics.record_retries(reply.attempts - 1)
            if reply.status == "unknown":
                metrics.record_unknown_outcome(lease.session.id)
                run.note("submit", outcome="unknown", retcode=reply.retcode)
                sent.unknown = True
                return sent
            if reply.status == "rejected":
                sent.rejected = reply
                return sent
            fill = fill_of_reply(reply, leg.position)
            if fill is not None:
                sent.fills.append(fill)
            else:  # placed (10008), or done without its deal: the settler reads its deals
                run.note("submit", outcome=reply.status, order=reply.order, deal=reply.deal)
                sent.orders.append(reply.order)
                sent.requested.append((reply.order, reply.requested_price))
        return sent

    def monitor(
        self, gateway: Gateway, order: int, requested_price: float, run: Run, lease: Lease
    ) -> tuple[Fill | None, bool]:
        """Poll a placed (10008) order until final or the order timeout, then cancel the rest.

        Returns the order's fill (None: nothing executed) and whether it timed out. An order
        that executed is settled from its deals only: until they show (within the order
        timeout) the execution stays in flight (TransportError).
        """
        deadline = self.clock() + self.settings.order_timeout_seconds
        delay = MONITOR_FIRST_POLL_SECONDS
        timed_out = False
        with run.stage("monitor"):
            while True:
                state = _or_none(lambda: gateway.order_state(order))  # failed: ask again
                if state is not None and state.state in FINAL_ORDER_STATES:
                    break
                if self.clock() >= deadline:
                    timed_out = True
                    cancel = gateway.cancel(order, fence=lease.fence)
                    run.note("monitor", cancelled=order, retcode=cancel.retcode)
                    state = gateway.order_state(order)
                    unfinished = state is None or state.state not in FINAL_ORDER_STATES
                    if cancel.status != "done" and unfinished:
                        # it may still fill: leave the row in flight, settle it later
                        raise api.TransportError(f"cancel of order {order} not confirmed")
                    break
                self.sleep(delay)
                delay = min(delay * 2, MONITOR_MAX_POLL_SECONDS)
            executed = Order.of(state).executed if state is not None else 0.0
            fill = self._deals_of(gateway, order, requested_price, executed, deadline)
        run.broker_calls("monitor", gateway.drain_calls())
        return fill, timed_out

    def confirm(self, gateway: Gateway, reply: SendOutcome, position: int | None, run: Run) -> Fill:
        """The fill of a done (10009/10010) reply: the reply's own when it names its deal,
        else from the order's deals (``deal`` may be 0 and its deal recorded later,
        ``order_send`` reference). Until they show (within the order timeout) the
        execution stays in flight. Used by the slippage close only."""
        confirmed = fill_of_reply(reply, position)
        if confirmed is not None:
            return confirmed
        deadline = self.clock() + self.settings.order_timeout_seconds
        with run.stage("monitor"):
            fill = self._deals_of(
                gateway, reply.order, reply.requested_price, executed_by(reply), deadline
            )
        run.broker_calls("monitor", gateway.drain_calls())
        assert fill is not None  # executed_by(reply) > 0
        # a closing leg names the position it closed; an opening one takes its deal's
        return fill if position is None else replace(fill, position=position)

    def _deals_of(
        self, gateway: Gateway, order: int, requested_price: float, executed: float, deadline: float
    ) -> Fill | None:
        """Poll the order's deals until they account for ``executed`` lots."""
        delay = MONITOR_FIRST_POLL_SECONDS
        while True:
            found = _or_none(lambda: gateway.deals_for_order(order))  # failed: ask again
            deals = [Deal.of(deal) for deal in found or ()]
            fill = fill_of_order(order, deals, requested_price)
            if found is not None and deals_visible(fill, executed):
                return fill
            if self.clock() >= deadline:
                raise api.TransportError(f"the deals of order {order} are not visible yet")
            self.sleep(delay)
            delay = min(delay * 2, MONITOR_MAX_POLL_SECONDS)

    def close(
        self,
        plan: Plan,
        spec: SymbolSpec,
        fills: Sequence[Fill],
        lease: Lease,
        run: Run,
        *,
        closed: Sequence[Fill] = (),
    ) -> tuple[list[Fill], bool]:
        """Slippage policy ``close``: take the fresh exposure off at once.

        ``closed``: our closing fills the broker already shows (an earlier handling's close
        whose reply was lost, or whose final commit failed); only what they leave open is
        closed now. Before the first closing order the stage is committed on the row
        (``closing_sent_at``), so a redelivery knows a close may be out and counts it.

        Returns the fills (each with the position it opened, looked up where unknown)
        followed by every closing fill, and whether every fill is closed in full.
        """
        gateway: Gateway = lease.session.gateway
        positioned: list[Fill] = []
        for fill in fills:
            if fill.position is None:
                # a reply names no position: its deals do, once they show (rare path: it
                # holds the session, within the order timeout)
                deadline = self.clock() + self.settings.order_timeout_seconds
                shown = self._deals_of(
                    gateway, fill.order, fill.requested_price, fill.volume, deadline
                )
                fill = replace(fill, position=shown.position if shown is not None else None)
            positioned.append(fill)
        closing: list[Fill] = list(closed)
        closed_all = True
        for _fill, close in closes_left(positioned, plan.side, closed):
            if close is None:
                continue
            self._record_closing(plan, lease, run, close)
            reply = gateway.send(
                spec,
                close.side,
                close.volume,
                identity=plan.identity,
                fence=lease.fence,
                deviation=plan.deviation,
                position=close.position,
            )
            run.broker_calls("slippage", gateway.drain_calls())
            if reply.status == "unknown":
                raise api.TransportError("the slippage close has an unknown outcome")
            closing_fill: Fill | None = None
            if reply.status == "placed":
                closing_fill, _ = self.monitor(
                    gateway, reply.order, reply.requested_price, run, lease
                )
            elif reply.status in ("done", "partial"):
                closing_fill = self.confirm(gateway, reply, close.position, run)
            if closing_fill is not None:
                closing.append(closing_fill)
            closed_volume = closing_fill.volume if closing_fill is not None else 0.0
            closed_all = closed_all and closed_volume >= close.volume - 1e-9
        return positioned + closing, closed_all

    def _record_closing(self, plan: Plan, lease: Lease, run: Run, close: Close) -> None:
        """Commit the closing stage through the lease's connection before the first close
        is sent (a failed commit sends nothing: the delivery is requeued). A test-and-set:
        a close already on record (another handling's) refuses, and nothing is sent."""
        if plan.closing_sent:
            return
        self.store.update_in_flight(
            lease.conn,
            plan.execution_id,
            {"closing_sent_at": datetime.now(UTC)},
            [
                *run.take_events(),
                Event("slippage", "transition", "CLOSING", detail={"lots": close.volume}),
            ],
            unset="closing_sent_at",
        )
        plan.closing_sent = True


def _or_none(query: Callable[[], T]) -> T | None:
    """The query's answer, or None when it failed (QueryFailed: the connection is up, the
    next call may answer). A lost session still raises."""
    try:
        return query()
    except QueryFailed:
        return None
