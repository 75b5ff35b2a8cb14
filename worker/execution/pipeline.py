"""One delivery in, one outcome out: validate -> intent -> submit -> monitor -> fills -> audit.

The exactly-once protocol (DOMAIN.md 3):
- the execution id, the broker comment token and the confirmation's message id all derive
  from the idempotency key, so a redelivery is recognised by the store and by the broker;
- a terminal row answers a redelivery with the same confirmation, no broker call;
- the intent row (SUBMITTING) is committed through the session lease's connection BEFORE
  ``order_send``; an in-flight row found later is settled from what the broker says
  (reconcile by comment token + magic), never by a blind resend;
- who may act on an execution: before its row exists, whoever inserts the intent (the
  primary key decides; a refusal never overwrites a row); once it exists, whoever holds the
  lease of the session named in the row, which is exclusive across threads and processes.
  So a first delivery needs no read before its intent: a key that already has a row shows
  up as a conflict of the intent insert (or of the refusal), and is then loaded;
- the final row, its events and the outbox row are committed in one transaction, and only
  then is the confirmation handed to the runtime for publishing and acking.

Database trouble at any point requeues the delivery: before the intent commit no order was
sent, after it the in-flight row makes the redelivery reconcile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import psycopg

from schemas.confirmation import ExecutionConfirmation
from schemas.enums import DecisionStatus, ExecutionStatus, RejectionReason
from schemas.identity import comment_token_for, execution_id_for
from schemas.request import ExecutionRequest, InvalidMessage, parse_request
from worker.config import Settings
from worker.execution.outcome import DeadLetter, Delivery, Outcome, Publish, Requeue
from worker.mt5 import api
from worker.mt5.gateway import (
    BrokerCall,
    Gateway,
    GatewayRejection,
    Reconciliation,
    SendOutcome,
    Side,
    SymbolSpec,
    signed_slippage_pips,
    vwap,
)
from worker.observability import metrics
from worker.pool.leases import ClaimTimeout, Lease
from worker.store.store import Event, ExecutionRow, Store, StoreError

log = logging.getLogger(__name__)

RECONCILE_PADDING = timedelta(minutes=5)
MONITOR_FIRST_POLL_SECONDS = 0.01
MONITOR_MAX_POLL_SECONDS = 0.5
FINAL_ORDER_STATES = frozenset(
    {
        api.ORDER_STATE_FILLED,
        api.ORDER_STATE_CANCELED,
        api.ORDER_STATE_REJECTED,
        api.ORDER_STATE_EXPIRED,
    }
)
# Final broker refusals that have a more specific reason than BROKER_REJECTED.
RETCODE_REASONS = {
    api.TRADE_RETCODE_MARKET_CLOSED: RejectionReason.MARKET_CLOSED,
    api.TRADE_RETCODE_NO_MONEY: RejectionReason.MARGIN_INSUFFICIENT,
    api.TRADE_RETCODE_INVALID_VOLUME: RejectionReason.VOLUME_INVALID,
    api.TRADE_RETCODE_TRADE_DISABLED: RejectionReason.SYMBOL_NOT_TRADABLE,
    api.TRADE_RETCODE_SERVER_DISABLES_AT: RejectionReason.TRADING_DISABLED,
    api.TRADE_RETCODE_CLIENT_DISABLES_AT: RejectionReason.TRADING_DISABLED,
}


class SessionSource(Protocol):
    """The session pool, as the pipeline sees it."""

    def claim(self, timeout: float, *, session_id: str | None = None) -> Lease: ...


@dataclass(frozen=True)
class Leg:
    """One order of a plan: ``lots`` to trade, closing ``position`` when set (hedging)."""

    lots: float
    position: int | None = None


@dataclass
class Fill:
    """What the broker executed for one order."""

    order: int
    deals: list[int]
    volume: float
    price: float
    requested_price: float
    position: int | None = None


@dataclass
class Plan:
    """Everything needed to send, monitor and settle one execution; rebuildable from its row."""

    execution_id: UUID
    idempotency_key: str
    rpm_order_id: str | None
    token: str
    symbol: str
    broker_symbol: str
    side: Side
    intended_units: float
    intended_lots: float
    legs: list[Leg]
    requested_price: float | None
    deviation: int
    spread_pips: float | None
    received_at: datetime
    decided_at: datetime | None
    reply_to: str | None
    correlation_id: str | None
    contract_size: float
    pip: float
    submitted_at: datetime | None = None
    attempts: int = 0
    arrival_bid: float | None = None  # the tick the checks used (issue 20: TCA)
    arrival_ask: float | None = None


@dataclass
class Run:
    """Bookkeeping of one handling: events, stage timings, attempts."""

    clock: Callable[[], float]
    started: float
    events: list[Event] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    submissions: int = 0
    submitted_at: datetime | None = None
    retcode: int | None = None
    broker_comment: str | None = None
    filling_mode: int | None = None  # of the last order sent

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        begin = self.clock()
        try:
            yield
        finally:
            seconds = self.clock() - begin
            self.timings_ms[name] = round(self.timings_ms.get(name, 0.0) + seconds * 1000, 3)
            metrics.observe_stage(name, seconds)

    def event(self, stage: str, state: str | None = None, **detail: Any) -> None:
        self.events.append(Event(stage, "transition", state, detail=detail or None))

    def note(self, stage: str, **detail: Any) -> None:
        self.events.append(Event(stage, "note", detail=detail or None))

    def broker_calls(self, stage: str, calls: list[BrokerCall]) -> None:
        """The stage's terminal calls on the record: one ``broker_call`` row per order sent
        (with its request), and the stage's read-only queries folded into ONE
        ``broker_queries`` row whose detail lists each (function, latency, error): a row
        per query would cost more than the queries themselves."""
        queries: list[dict[str, Any]] = []
        sent: list[Event] = []
        for call in calls:
            if call.retcode is not None:
                metrics.record_retcode(call.retcode)
            if call.request is None:
                query: dict[str, Any] = {"function": call.function, "latency_ms": call.latency_ms}
                if call.error is not None:
                    query["error"] = list(call.error)
                queries.append(query)
                continue
            detail: dict[str, Any] = {"request": call.request}
            if call.error is not None:
                detail["error"] = list(call.error)
            sent.append(
                Event(
                    stage,
                    "broker_call",
                    function=call.function,
                    retcode=call.retcode,
                    latency_ms=call.latency_ms,
                    detail=detail,
                    at=call.at,
                )
            )
        if queries:
            self.events.append(
                Event(
                    stage,
                    "broker_queries",
                    latency_ms=round(sum(query["latency_ms"] for query in queries), 3),
                    detail={"calls": queries},
                    at=calls[0].at,
                )
            )
        self.events.extend(sent)

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events


class Pipeline:
    """The handler the runtime calls on worker threads (thread-safe; state per call)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        sessions: SessionSource,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sessions = sessions
        self.clock = clock
        self.sleep = sleep

    # --- entry points ------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> Outcome:
        """Never raises: database or terminal trouble becomes a requeue."""
        return self._guarded(lambda: self._handle(delivery))

    def resume(self, row: ExecutionRow) -> Outcome:
        """Settle an in-flight row from the broker's truth (recovery sweep, ``reconcile``)."""
        return self._guarded(lambda: self._resume(row))

    def _guarded(self, work: Callable[[], Outcome]) -> Outcome:
        try:
            return work()
        except (psycopg.Error, StoreError) as exc:
            log.warning("database unavailable, requeued: %s", type(exc).__name__)
            return Requeue(f"database: {type(exc).__name__}")
        except api.TransportError as exc:
            # the terminal failed mid-way (SessionLost, a dropped bridge, an unconfirmed
            # cancel): any row stays in flight and is settled later from the broker's truth
            log.warning("terminal unavailable, requeued: %s", exc)
            return Requeue(f"terminal: {type(exc).__name__}")
        except Exception:
            log.exception("unexpected error, requeued")
            return Requeue("internal error")

    def _resume(self, row: ExecutionRow) -> Outcome:
        try:
            lease = self.sessions.claim(
                self.settings.claim_timeout_seconds, session_id=row.get("session_id")
            )
        except ClaimTimeout:
            return Requeue("no MT5 session available")
        with lease:
            # read under the row's session lease: the state its last holder left
            current = self.store.load(lease.conn, row.execution_id)
            if current is None:
                return Requeue("row vanished")
            if current.terminal:
                return self._recorded(lease.conn, current)
            run = Run(self.clock, self.clock())
            return self._settle(_plan_from_row(current), lease, run, resumed=True)

    # --- the path of one delivery ------------------------------------------------------

    def _handle(self, delivery: Delivery) -> Outcome:
        run = Run(self.clock, self.clock())
        try:
            with run.stage("parse"):
                request = parse_request(
                    delivery.body,
                    delivery.properties,
                    received_at=delivery.received_at,
                    max_body_bytes=self.settings.max_body_bytes,
                    parse_timeout_seconds=self.settings.parse_timeout_seconds,
                )
        except InvalidMessage as invalid:
            metrics.record_received("invalid", redelivered=delivery.redelivered)
            if invalid.idempotency_key is None:
                return DeadLetter(invalid.code, f"{invalid.field}: {invalid.detail}")
            return self._reject_invalid(invalid, delivery, run)
        metrics.record_received("valid", redelivered=delivery.redelivered)

        refusal = self._refusal(request)
        if refusal is not None:
            # decided by the message alone: no session; an existing row is kept
            with self.store.connection() as conn:
                return self._finish_rejection(conn, request, *refusal, run)

        with run.stage("claim"):
            try:
                lease = self.sessions.claim(self.settings.claim_timeout_seconds)
            except ClaimTimeout:
                return Requeue("no MT5 session available")
        with lease:
            # a redelivery most likely has a row; a first delivery is loaded only if its
            # intent conflicts (see the module's docstring)
            row = None
            if delivery.redelivered:
                row = self.store.load(lease.conn, request.execution_id)
            if row is None:
                stale = self._staleness(request.decided_at)
                if stale is not None:
                    return self._finish_rejection(lease.conn, request, *stale, run)
                executed = self._execute(request, lease, run)
                if executed is not None:
                    return executed
                row = self.store.load(lease.conn, request.execution_id)
                if row is None:
                    return Requeue("the execution's row vanished")
            if row.terminal:
                return self._recorded(lease.conn, row)
            if row.get("session_id") == lease.session.id:
                return self._settle(_plan_from_row(row), lease, run, resumed=True)
        # in flight on another session: it is settled on the account it was sent to
        return self.resume(row)

    def _refusal(self, request: ExecutionRequest) -> tuple[RejectionReason, str] | None:
        """Refusals that follow from the message itself: they never reach the broker.

        (Staleness depends on the time too, so it is judged only for a key without a row: a
        redelivery of an approval already in flight must be settled, not refused.)
        """
        if request.status not in (DecisionStatus.APPROVED, DecisionStatus.ADJUSTED):
            return RejectionReason.NOT_APPROVED, f"RPM status {request.status.value}"
        if request.kill_switch:
            return RejectionReason.KILL_SWITCH, request.kill_switch_reason or "kill switch set"
        if request.trading_halted:
            return RejectionReason.TRADING_HALTED, request.halt_reason or "trading halted"
        return None

    def _staleness(self, decided_at: datetime | None) -> tuple[RejectionReason, str] | None:
        if decided_at is None:
            return None
        age = self.clock() - decided_at.timestamp()
        if age > self.settings.approval_ttl_seconds:
            return (
                RejectionReason.STALE_APPROVAL,
                f"approval is {age:.1f} s old (TTL {self.settings.approval_ttl_seconds:g} s)",
            )
        return None

    def _execute(self, request: ExecutionRequest, lease: Lease, run: Run) -> Outcome | None:
        """Validate, commit the intent, send. None: the key already has a row (no order)."""
        trade = request.trade
        assert trade is not None  # _refusal guarantees an approved trade
        gateway: Gateway = lease.session.gateway
        side = Side(trade.direction)
        broker_symbol = self.settings.broker_symbol_for(trade.symbol)
        try:
            with run.stage("validate"):
                spec = gateway.symbol_spec(broker_symbol)
                account = gateway.account()  # one reading for every check of this order
                gateway.check_trading_allowed(spec, side, account)
                snapshot = gateway.snapshot(spec)
                limit = self.settings.spread_limit_for(trade.symbol)
                if snapshot.spread_pips > limit:
                    raise GatewayRejection(
                        RejectionReason.SPREAD_TOO_WIDE,
                        f"spread {snapshot.spread_pips:.2f} pips > limit {limit:g} pips",
                    )
                lot_plan = gateway.lots_for(
                    spec, trade.position_units, self.settings.volume_over_max
                )
                price = snapshot.ask if side is Side.BUY else snapshot.bid
                legs = self._legs(gateway, spec, side, lot_plan.chunks, account)
                opening = sum(leg.lots for leg in legs if leg.position is None)
                if opening > 0:
                    gateway.check_margin(
                        spec, side, opening, price, self.settings.margin_cushion, account
                    )
                deviation = gateway.deviation_points(
                    spec, self.settings.slippage_limit_for(trade.symbol)
                )
        except GatewayRejection as rejection:
            run.broker_calls("validate", gateway.drain_calls())
            return self._finish_rejection(
                lease.conn,
                request,
                rejection.reason,
                rejection.details,
                run,
                retcode=rejection.retcode,
                session=lease,
            )
        run.broker_calls("validate", gateway.drain_calls())
        run.event("validate", "VALIDATED", spread_pips=snapshot.spread_pips)

        plan = Plan(
            execution_id=request.execution_id,
            idempotency_key=request.idempotency_key,
            rpm_order_id=request.rpm_order_id,
            token=request.comment_token,
            symbol=trade.symbol,
            broker_symbol=broker_symbol,
            side=side,
            intended_units=trade.position_units,
            intended_lots=lot_plan.lots,
            legs=legs,
            requested_price=price,
            deviation=deviation,
            spread_pips=snapshot.spread_pips,
            received_at=request.received_at,
            decided_at=request.decided_at,
            reply_to=request.reply_to,
            correlation_id=request.correlation_id,
            contract_size=spec.contract_size,
            pip=spec.pip,
            arrival_bid=snapshot.bid,
            arrival_ask=snapshot.ask,
        )
        run.submitted_at = datetime.now(UTC)
        with run.stage("intent"):
            run.event("intent", "SUBMITTING", legs=len(legs), lots=lot_plan.lots)
            fields = self._intent_fields(plan, request, lease, run)
            if not self.store.insert_intent(lease.conn, fields, run.take_events()):
                return None
        return self._submit(plan, spec, lease, run)

    def _legs(
        self,
        gateway: Gateway,
        spec: SymbolSpec,
        side: Side,
        chunks: tuple[float, ...],
        account: api.AccountInfo,
    ) -> list[Leg]:
        """On hedging accounts an opposite approval closes our opposite positions first."""
        total = sum(chunks)
        legs: list[Leg] = []
        if (
            self.settings.hedging_close_opposite
            and account.margin_mode == api.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING
        ):
            remaining = total
            for position in gateway.opposite_positions(spec, side):
                if remaining < spec.volume_min / 2:
                    break
                close = _round_step(min(position.volume, remaining), spec.volume_step)
                if close <= 0:
                    continue
                legs.append(Leg(close, position.ticket))
                remaining = _round_step(remaining - close, spec.volume_step)
            if not legs:
                return [Leg(lots) for lots in chunks]
            while remaining >= spec.volume_min:
                lots = min(remaining, spec.volume_max)
                legs.append(Leg(lots))
                remaining = _round_step(remaining - lots, spec.volume_step)
            return legs
        return [Leg(lots) for lots in chunks]

    # --- submit, monitor, settle -------------------------------------------------------

    def _submit(self, plan: Plan, spec: SymbolSpec, lease: Lease, run: Run) -> Outcome:
        gateway: Gateway = lease.session.gateway
        run.submissions += 1
        fills: list[Fill] = []
        timed_out = False
        final_reject: SendOutcome | None = None
        for leg in plan.legs:
            try:
                with run.stage("submit"):
                    outcome = gateway.send(
                        spec,
                        plan.side,
                        leg.lots,
                        comment=plan.token,
                        deviation=plan.deviation,
                        position=leg.position,
                    )
            except GatewayRejection as refused:
                # nothing was sent for this leg (no quote, no filling mode)
                run.broker_calls("submit", gateway.drain_calls())
                if fills:
                    break
                return self._finish(
                    plan,
                    lease,
                    run,
                    [],
                    reason=refused.reason,
                    details=refused.details,
                    spec=spec,
                )
            run.broker_calls("submit", gateway.drain_calls())
            run.attempts += outcome.attempts
            run.retcode = outcome.retcode
            run.broker_comment = outcome.comment
            run.filling_mode = outcome.filling_mode
            if outcome.attempts > 1:
                metrics.record_retries(outcome.attempts - 1)
            if outcome.status == "unknown":
                metrics.record_unknown_outcome(lease.session.id)
                run.note("submit", outcome="unknown", retcode=outcome.retcode)
                return self._settle(plan, lease, run, resumed=False, spec=spec)
            if outcome.status == "rejected":
                final_reject = outcome
                break
            if outcome.status == "placed":
                self.store.update_in_flight(
                    lease.conn,
                    plan.execution_id,
                    {"state": "SUBMITTED", "broker_order": outcome.order},
                    [*run.take_events(), Event("submit", "transition", "SUBMITTED")],
                )
                fill, leg_timed_out = self._monitor(gateway, outcome.order, outcome, run)
                timed_out = timed_out or leg_timed_out
                if fill is not None:
                    fills.append(fill)
                continue
            fills.append(
                Fill(
                    order=outcome.order,
                    deals=[outcome.deal] if outcome.deal else [],
                    volume=outcome.volume,
                    price=outcome.price,
                    requested_price=outcome.requested_price,
                    position=leg.position,
                )
            )
        if not fills and final_reject is not None:
            reason = RETCODE_REASONS.get(final_reject.retcode or 0, RejectionReason.BROKER_REJECTED)
            details = f"retcode {final_reject.retcode}: {final_reject.comment}"
            return self._finish(plan, lease, run, [], reason=reason, details=details, spec=spec)
        return self._finish(plan, lease, run, fills, timed_out=timed_out, spec=spec)

    def _fills_of_orders(
        self, gateway: Gateway, found: Reconciliation, plan: Plan, run: Run
    ) -> list[Fill]:
        """Our order or position exists but the deals window showed no deal: ask by ticket.

        Settling with nothing filled is only right when every order we sent is final
        without a fill; otherwise (history lag, a position without its deal) the row stays
        in flight and is settled later.
        """
        deals = tuple(
            deal for order in found.history_orders for deal in gateway.deals_for_order(order.ticket)
        )
        run.broker_calls("reconcile", gateway.drain_calls())
        fills = _fills_from_deals(deals, plan)
        unfilled_final = all(
            order.state
            in (api.ORDER_STATE_CANCELED, api.ORDER_STATE_REJECTED, api.ORDER_STATE_EXPIRED)
            for order in found.history_orders
        )
        if not fills and (found.positions or not unfilled_final):
            raise api.TransportError("the broker shows our order but not yet its deals")
        return fills

    def _monitor(
        self, gateway: Gateway, order: int, placed: SendOutcome, run: Run
    ) -> tuple[Fill | None, bool]:
        """Poll a placed (10008) order until final or the order timeout, then cancel the rest."""
        deadline = self.clock() + self.settings.order_timeout_seconds
        delay = MONITOR_FIRST_POLL_SECONDS
        timed_out = False
        with run.stage("monitor"):
            while True:
                state = gateway.order_state(order)
                if state is not None and state.state in FINAL_ORDER_STATES:
                    break
                if self.clock() >= deadline:
                    timed_out = True
                    cancel = gateway.cancel(order)
                    run.note("monitor", cancelled=order, retcode=cancel.retcode)
                    after = gateway.order_state(order)
                    if cancel.status != "done" and (
                        after is None or after.state not in FINAL_ORDER_STATES
                    ):
                        # it may still fill: leave the row in flight, settle it later
                        raise api.TransportError(f"cancel of order {order} not confirmed")
                    break
                self.sleep(delay)
                delay = min(delay * 2, MONITOR_MAX_POLL_SECONDS)
            deals = gateway.deals_for_order(order)
        run.broker_calls("monitor", gateway.drain_calls())
        price = vwap(deals)
        if price is None:
            return None, timed_out
        volume = sum(deal.volume for deal in deals)
        return (
            Fill(
                order=order,
                deals=[deal.ticket for deal in deals],
                volume=volume,
                price=price,
                requested_price=placed.requested_price,
                position=deals[0].position_id if deals else None,
            ),
            timed_out,
        )

    def _settle(
        self,
        plan: Plan,
        lease: Lease,
        run: Run,
        *,
        resumed: bool,
        spec: SymbolSpec | None = None,
    ) -> Outcome:
        """The outcome is unknown (lost reply, crash, redelivery): ask the broker.

        Found -> finish from the broker's deals (monitoring a still-pending order). Not found,
        even after a grace period for a terminal still processing -> the order never reached
        the broker; it is sent again with the same comment token, if the approval is still
        fresh and attempts remain. A terminal that cannot answer leaves the row in flight.
        """
        gateway: Gateway = lease.session.gateway
        if resumed:  # the audit keeps what earlier deliveries did
            run.attempts = max(run.attempts, plan.attempts)
            run.submitted_at = run.submitted_at or plan.submitted_at
        since = plan.received_at - RECONCILE_PADDING
        try:
            with run.stage("reconcile"):
                found = gateway.reconcile(plan.token, plan.broker_symbol, since)
                if not found.found and self.settings.reconcile_grace_seconds > 0:
                    self.sleep(self.settings.reconcile_grace_seconds)
                    found = gateway.reconcile(plan.token, plan.broker_symbol, since)
        except (GatewayRejection, api.TransportError) as exc:
            run.broker_calls("reconcile", gateway.drain_calls())
            run.note("reconcile", error=str(exc)[:200])
            self._save_events(lease, plan.execution_id, run)
            return Requeue("outcome unknown and the terminal cannot be asked")
        run.broker_calls("reconcile", gateway.drain_calls())
        run.note("reconcile", found=found.found, resumed=resumed, deals=len(found.deals))
        if found.found:
            fills = _fills_from_deals(found.deals, plan)
            if not fills and not found.open_orders:
                fills = self._fills_of_orders(gateway, found, plan, run)
            timed_out = False
            for order in found.open_orders:
                placed = SendOutcome(
                    status="placed",
                    retcode=api.TRADE_RETCODE_PLACED,
                    order=order.ticket,
                    deal=0,
                    volume=0.0,
                    price=0.0,
                    bid=0.0,
                    ask=0.0,
                    comment="",
                    attempts=0,
                    requested_price=plan.requested_price or order.price_open,
                    filling_mode=order.type_filling,
                    deviation=plan.deviation,
                )
                fill, leg_timed_out = self._monitor(gateway, order.ticket, placed, run)
                timed_out = timed_out or leg_timed_out
                fills = [f for f in fills if f.order != order.ticket]
                if fill is not None:
                    fills.append(fill)
            return self._finish(plan, lease, run, fills, timed_out=timed_out)

        stale = self._staleness(plan.decided_at)
        if stale is not None:
            return self._finish(plan, lease, run, [], reason=stale[0], details=stale[1])
        if run.submissions >= self.settings.max_send_attempts:
            return self._finish(
                plan,
                lease,
                run,
                [],
                reason=RejectionReason.UNKNOWN_OUTCOME,
                details=f"no order reached the broker after {run.submissions} submissions",
                status=ExecutionStatus.FAILED,
            )
        run.note("reconcile", resend=True)
        try:
            spec = spec or gateway.symbol_spec(plan.broker_symbol)
        except GatewayRejection as rejection:
            run.broker_calls("reconcile", gateway.drain_calls())
            return self._finish(
                plan, lease, run, [], reason=rejection.reason, details=rejection.details
            )
        return self._submit(plan, spec, lease, run)

    # --- finishing -----------------------------------------------------------------------

    def _finish(
        self,
        plan: Plan,
        lease: Lease,
        run: Run,
        fills: list[Fill],
        *,
        timed_out: bool = False,
        reason: RejectionReason | None = None,
        details: str | None = None,
        status: ExecutionStatus | None = None,
        spec: SymbolSpec | None = None,
    ) -> Outcome:
        gateway: Gateway = lease.session.gateway
        if plan.contract_size <= 0 or plan.pip <= 0:  # a row from before these were kept
            spec = spec or gateway.symbol_spec(plan.broker_symbol)
            plan.contract_size, plan.pip = spec.contract_size, spec.pip
        contract = plan.contract_size
        executed_lots = round(sum(fill.volume for fill in fills), 8)
        fill_price = (
            sum(fill.volume * fill.price for fill in fills) / executed_lots
            if executed_lots > 0
            else None
        )
        requested = (
            sum(fill.volume * fill.requested_price for fill in fills) / executed_lots
            if executed_lots > 0
            else plan.requested_price
        )
        slippage = None
        if fill_price is not None and requested is not None:
            slippage = round(signed_slippage_pips(plan.side, requested, fill_price, plan.pip), 4)
            metrics.record_slippage(plan.symbol, plan.side.name.lower(), slippage)
            metrics.record_shortfall(
                plan.symbol,
                plan.side.value,
                plan.arrival_bid,
                plan.arrival_ask,
                fill_price,
                plan.pip,
            )

        if status is None:
            status, reason, details = self._classify(
                plan, executed_lots, timed_out, reason, details
            )
        limit = self.settings.slippage_limit_for(plan.symbol)
        if slippage is not None and slippage > limit and executed_lots > 0:
            metrics.record_slippage_breach(plan.symbol)
            breach = f"slippage {slippage:.2f} pips > limit {limit:g} pips"
            if self.settings.slippage_policy == "close":
                spec = spec or gateway.symbol_spec(plan.broker_symbol)
                closing, closed_all = self._close_fills(gateway, spec, plan, fills, run)
                fills = fills + closing
                if closed_all:
                    status = ExecutionStatus.CANCELLED
                    reason, details = RejectionReason.SLIPPAGE_EXCEEDED, f"{breach}; closed at once"
                else:
                    reason = RejectionReason.SLIPPAGE_EXCEEDED
                    details = f"{breach}; closing it FAILED: the position may still be open"
            elif reason is None:
                reason, details = RejectionReason.SLIPPAGE_EXCEEDED, breach

        run.event("commit", status.value, executed_lots=executed_lots)
        deals = [deal for fill in fills for deal in fill.deals]
        order = fills[0].order if fills else None
        position = next((fill.position for fill in fills if fill.position), None)
        completed = datetime.now(UTC)
        run.timings_ms["total"] = round((self.clock() - run.started) * 1000, 3)
        confirmation = ExecutionConfirmation(
            execution_id=plan.execution_id,
            order_id=plan.rpm_order_id,
            idempotency_key=plan.idempotency_key,
            status=status,
            rejection_reason=reason,
            rejection_details=details,
            symbol=plan.symbol,
            broker_symbol=plan.broker_symbol,
            direction=plan.side.value,
            intended_units=plan.intended_units,
            executed_units=round(executed_lots * contract, 6),
            intended_lots=plan.intended_lots,
            executed_lots=executed_lots,
            requested_price=requested,
            fill_price=fill_price,
            spread_pips_at_submit=plan.spread_pips,
            slippage_pips=slippage,
            broker_order=order,
            broker_deals=deals,
            broker_position=position,
            retcode=run.retcode,
            broker_comment=run.broker_comment,
            attempts=run.attempts,
            session_id=lease.session.id,
            account_login=lease.session.login,
            timings_ms=dict(run.timings_ms),
            received_at=plan.received_at,
            submitted_at=run.submitted_at,
            completed_at=completed,
        )
        fields = _terminal_fields(confirmation, plan.token, filling_mode=run.filling_mode)
        mine = _publish_of(confirmation, plan)
        with run.stage("commit"):
            kept = self.store.finish(lease.conn, fields, run.take_events(), mine)
        return _counted(kept, mine, status.value, reason.value if reason else None)

    def _classify(
        self,
        plan: Plan,
        executed_lots: float,
        timed_out: bool,
        reason: RejectionReason | None,
        details: str | None,
    ) -> tuple[ExecutionStatus, RejectionReason | None, str | None]:
        """The partial-fill rule: the ratio of executed to intended lots decides."""
        if executed_lots <= 0:
            if timed_out:
                return (
                    ExecutionStatus.EXPIRED,
                    RejectionReason.ORDER_TIMEOUT,
                    f"nothing filled within {self.settings.order_timeout_seconds:g} s",
                )
            return ExecutionStatus.REJECTED, reason or RejectionReason.BROKER_REJECTED, details
        ratio = executed_lots / plan.intended_lots if plan.intended_lots else 1.0
        metrics.observe_fill_ratio(ratio)
        if ratio >= self.settings.fill_ratio_filled:
            return ExecutionStatus.FILLED, None, None
        described = f"filled {executed_lots:g} of {plan.intended_lots:g} lots ({ratio:.1%})"
        if ratio >= self.settings.fill_ratio_partial:
            return ExecutionStatus.PARTIALLY_FILLED, None, described
        return ExecutionStatus.PARTIALLY_FILLED, RejectionReason.INSUFFICIENT_FILL, described

    def _close_fills(
        self, gateway: Gateway, spec: SymbolSpec, plan: Plan, fills: list[Fill], run: Run
    ) -> tuple[list[Fill], bool]:
        """Slippage policy ``close``: take the fresh exposure off at once.

        Returns the closing fills and whether every one closed in full.
        """
        closing: list[Fill] = []
        closed_all = True
        opposite = Side.SELL if plan.side is Side.BUY else Side.BUY
        for fill in fills:
            if fill.position is None:
                deals = gateway.deals_for_order(fill.order)
                fill.position = deals[0].position_id if deals else None
            outcome = gateway.send(
                spec,
                opposite,
                fill.volume,
                comment=plan.token,
                deviation=plan.deviation,
                position=fill.position,
            )
            run.broker_calls("slippage", gateway.drain_calls())
            if outcome.status == "unknown":
                raise api.TransportError("the slippage close has an unknown outcome")
            if outcome.status in ("done", "partial"):
                closing.append(
                    Fill(outcome.order, [outcome.deal], 0.0, outcome.price, outcome.price)
                )
            closed_all = (
                closed_all and outcome.status == "done" and (outcome.volume >= fill.volume - 1e-9)
            )
        return closing, closed_all

    def _finish_rejection(
        self,
        conn: psycopg.Connection[Any],
        request: ExecutionRequest,
        reason: RejectionReason,
        details: str,
        run: Run,
        *,
        retcode: int | None = None,
        session: Lease | None = None,
    ) -> Outcome:
        """A refusal before any order: terminal row + outbox in one transaction.

        Insert-only: a key that already has a row keeps it (its recorded confirmation is
        answered, or the delivery is requeued while that row is in flight).
        """
        trade = request.trade
        run.event("validate", "REJECTED", reason=reason.value)
        now = datetime.now(UTC)
        run.timings_ms["total"] = round((self.clock() - run.started) * 1000, 3)
        confirmation = ExecutionConfirmation(
            execution_id=request.execution_id,
            order_id=request.rpm_order_id,
            idempotency_key=request.idempotency_key,
            status=ExecutionStatus.REJECTED,
            rejection_reason=reason,
            rejection_details=details,
            symbol=trade.symbol if trade else None,
            broker_symbol=self.settings.broker_symbol_for(trade.symbol) if trade else None,
            direction=trade.direction if trade else None,
            intended_units=trade.position_units if trade else None,
            retcode=retcode,
            session_id=session.session.id if session else None,
            account_login=session.session.login if session else None,
            timings_ms=dict(run.timings_ms),
            received_at=request.received_at,
            completed_at=now,
        )
        fields = _terminal_fields(
            confirmation,
            request.comment_token,
            magic=self.settings.magic,
            request=_request_snapshot(request),
            decided_at=request.decided_at,
        )
        mine = _publish(confirmation, request.correlation_id, request.reply_to)
        with run.stage("commit"):
            try:
                kept = self.store.finish(conn, fields, run.take_events(), mine, insert_only=True)
            except StoreError:
                return Requeue("a delivery of this key is in flight")
        return _counted(kept, mine, "REJECTED", reason.value)

    def _reject_invalid(self, invalid: InvalidMessage, delivery: Delivery, run: Run) -> Outcome:
        """Invalid but keyed: a REJECTED confirmation (INVALID_REQUEST) on the record."""
        assert invalid.idempotency_key is not None
        key = invalid.idempotency_key
        execution_id = execution_id_for(key)
        details = f"{invalid.field}: {invalid.detail}"
        received = delivery.received_at.astimezone(UTC)
        symbol = invalid.symbol if invalid.symbol and _routable(invalid.symbol) else None
        confirmation = ExecutionConfirmation(
            execution_id=execution_id,
            order_id=invalid.rpm_order_id,
            idempotency_key=key,
            status=ExecutionStatus.REJECTED,
            rejection_reason=RejectionReason.INVALID_REQUEST,
            rejection_details=details,
            symbol=symbol,
            received_at=received,
            completed_at=datetime.now(UTC),
        )
        correlation = delivery.properties.correlation_id or invalid.rpm_order_id
        run.event("validate", "REJECTED", reason="INVALID_REQUEST", code=invalid.code)
        fields = _terminal_fields(confirmation, comment_token_for(execution_id))
        mine = _publish(confirmation, correlation, delivery.properties.reply_to or None)
        with self.store.connection() as conn:
            try:
                kept = self.store.finish(conn, fields, run.take_events(), mine, insert_only=True)
            except StoreError:
                return Requeue("a valid delivery of this key is in flight")
        return _counted(kept, mine, "REJECTED", RejectionReason.INVALID_REQUEST.value)

    def _recorded(self, conn: psycopg.Connection[Any], row: ExecutionRow) -> Outcome:
        """A terminal row: the same confirmation again, no broker call."""
        metrics.record_duplicate()
        published = self.store.confirmation_of(conn, row.execution_id)
        if published is None:
            raise StoreError(f"terminal execution {row.execution_id} has no outbox row")
        return published

    def _intent_fields(
        self, plan: Plan, request: ExecutionRequest, lease: Lease, run: Run
    ) -> dict[str, Any]:
        snapshot = _request_snapshot(request)
        snapshot["legs"] = [[leg.lots, leg.position] for leg in plan.legs]
        # what settling needs even if the terminal cannot describe the symbol then
        snapshot["contract_size"] = plan.contract_size
        snapshot["pip"] = plan.pip
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
            "magic": self.settings.magic,
            "session_id": lease.session.id,
            "account_login": lease.session.login,
            "request": snapshot,
            "decided_at": plan.decided_at,
            "received_at": plan.received_at,
            "submitted_at": run.submitted_at,
            "arrival_bid": plan.arrival_bid,
            "arrival_ask": plan.arrival_ask,
        }

    def _save_events(self, lease: Lease, execution_id: UUID, run: Run) -> None:
        try:
            self.store.append_events(lease.conn, execution_id, run.take_events())
        except (psycopg.Error, StoreError):
            log.warning("could not record events of %s", execution_id)


# --- helpers --------------------------------------------------------------------------------


def _round_step(volume: float, step: float) -> float:
    """Round to the volume step (nearest, to undo float noise; never used to upsize)."""
    steps = round(volume / step)
    return round(steps * step, 8)


def _routable(symbol: str) -> bool:
    return symbol.isascii() and symbol.replace(".", "").replace("_", "").isalnum()


def _fills_from_deals(deals: tuple[api.TradeDeal, ...], plan: Plan) -> list[Fill]:
    by_order: dict[int, Fill] = {}
    ours = api.DEAL_TYPE_BUY if plan.side is Side.BUY else api.DEAL_TYPE_SELL
    for deal in deals:
        if deal.type != ours:  # e.g. the close of SLIPPAGE_POLICY=close: not a fill
            continue
        fill = by_order.get(deal.order)
        requested = plan.requested_price if plan.requested_price is not None else deal.price
        if fill is None:
            by_order[deal.order] = Fill(
                deal.order, [deal.ticket], deal.volume, deal.price, requested, deal.position_id
            )
            continue
        volume = fill.volume + deal.volume
        fill.price = (fill.price * fill.volume + deal.price * deal.volume) / volume
        fill.volume = volume
        fill.deals.append(deal.ticket)
    return list(by_order.values())


def _terminal_fields(
    confirmation: ExecutionConfirmation, comment_token: str, **extra: Any
) -> dict[str, Any]:
    """The final audit row mirrors the confirmation it commits with."""
    c = confirmation
    fields: dict[str, Any] = {
        "execution_id": c.execution_id,
        "idempotency_key": c.idempotency_key,
        "rpm_order_id": c.order_id,
        "state": c.status.value,
        "rejection_reason": c.rejection_reason.value if c.rejection_reason else None,
        "rejection_details": c.rejection_details,
        "symbol": c.symbol,
        "broker_symbol": c.broker_symbol,
        "direction": c.direction,
        "intended_units": c.intended_units,
        "intended_lots": c.intended_lots,
        "executed_units": c.executed_units,
        "executed_lots": c.executed_lots,
        "requested_price": c.requested_price,
        "fill_price": c.fill_price,
        "spread_pips": c.spread_pips_at_submit,
        "slippage_pips": c.slippage_pips,
        "comment_token": comment_token,
        "session_id": c.session_id,
        "account_login": c.account_login,
        "broker_order": c.broker_order,
        "broker_deals": c.broker_deals,
        "broker_position": c.broker_position,
        "retcode": c.retcode,
        "broker_comment": c.broker_comment,
        "attempts": c.attempts,
        "received_at": c.received_at,
        "submitted_at": c.submitted_at,
        "completed_at": c.completed_at,
    }
    fields.update(extra)
    return fields


def _request_snapshot(request: ExecutionRequest) -> dict[str, Any]:
    snapshot: dict[str, Any] = request.model_dump(mode="json")  # JSON types already
    return snapshot


def _publish(
    confirmation: ExecutionConfirmation, correlation_id: str | None, reply_to: str | None
) -> Publish:
    return Publish(
        execution_id=confirmation.execution_id,
        routing_key=confirmation.routing_key(),
        payload=confirmation.to_json_bytes(),
        correlation_id=correlation_id,
        reply_to=reply_to,
    )


def _counted(kept: Publish, mine: Publish, status: str, reason: str | None) -> Publish:
    """Count the outcome just committed; a key's earlier outcome kept instead is a duplicate."""
    if kept is mine:
        metrics.record_outcome(status, reason)
    else:
        metrics.record_duplicate()
    return kept


def _publish_of(confirmation: ExecutionConfirmation, plan: Plan) -> Publish:
    return _publish(confirmation, plan.correlation_id, plan.reply_to)


def _plan_from_row(row: ExecutionRow) -> Plan:
    """Rebuild the plan of an in-flight row (redelivery, restart)."""
    snapshot: dict[str, Any] = row.get("request") or {}
    legs = [Leg(float(lots), position) for lots, position in snapshot.get("legs", [])]
    return Plan(
        execution_id=row.execution_id,
        idempotency_key=row.get("idempotency_key"),
        rpm_order_id=row.get("rpm_order_id"),
        token=row.get("comment_token"),
        symbol=row.get("symbol"),
        broker_symbol=row.get("broker_symbol"),
        side=Side(row.get("direction")),
        intended_units=row.get("intended_units"),
        intended_lots=row.get("intended_lots"),
        legs=legs or [Leg(row.get("intended_lots"))],
        requested_price=row.get("requested_price"),
        deviation=row.get("deviation_points") or 0,
        spread_pips=row.get("spread_pips"),
        received_at=row.get("received_at"),
        decided_at=row.get("decided_at"),
        reply_to=snapshot.get("reply_to"),
        correlation_id=snapshot.get("correlation_id") or row.get("rpm_order_id"),
        contract_size=float(snapshot.get("contract_size") or 0.0),
        pip=float(snapshot.get("pip") or 0.0),
        submitted_at=row.get("submitted_at"),
        attempts=row.get("attempts") or 0,
        arrival_bid=row.get("arrival_bid"),
        arrival_ask=row.get("arrival_ask"),
    )
