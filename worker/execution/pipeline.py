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
  then is the confirmation handed to the runtime for publishing and acking;
- the slippage close's stage (``closing_sent_at``) is committed before its first order; a
  later handling counts our closing deals (the deals against the execution's direction) and
  closes only what they leave open;
- the broker showing nothing after an intent is no proof: the answer is provisional (row
  UNKNOWN, confirmation ``provisional``), rechecked in the background with backoff, and a
  corrected confirmation (same execution id, next ``version``) is committed when the broker
  shows otherwise or the window ends;
- a stale approval is refused before a session is claimed; on its last deliveries before the
  queue's limit an approval that would be requeued is answered (REJECTED, or its recorded
  answer) or dead-lettered with a reason, never left to the queue's silent dead letter.

Database trouble at any point requeues the delivery: before the intent commit no order was
sent, after it the in-flight row makes the redelivery reconcile.

This module only orchestrates; the parts: ``checks`` (refusals before any send), ``plan``
(legs; a plan rebuilt from its row), ``submit`` (intent, send, monitor), ``inquiry`` (what
the broker knows, gathered), ``settle`` (pure: broker truth -> fills and final status),
``finish`` (final row + outbox), ``audit`` (events, stage timings, broker calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Protocol

import psycopg

from schemas.confirmation import ExecutionConfirmation
from schemas.enums import ExecutionStatus, RejectionReason
from schemas.identity import execution_id_for
from schemas.request import ExecutionRequest, InvalidMessage, parse_request
from worker.config import Settings
from worker.execution import checks, inquiry, settle
from worker.execution.audit import Run, save_events
from worker.execution.finish import Finisher
from worker.execution.outcome import DeadLetter, Delivery, Outcome, Requeue
from worker.execution.plan import Plan, plan_for, plan_from_row
from worker.execution.settle import Fill, FillRule, Resend
from worker.execution.submit import Sender
from worker.mt5 import api
from worker.mt5.gateway import Gateway, GatewayRejection, SymbolSpec
from worker.observability import metrics
from worker.observability.logs import log_context
from worker.pool.leases import ClaimTimeout, Lease, LeaseLost
from worker.store.store import UNKNOWN_STATE, ExecutionRow, Store, StoreError

log = logging.getLogger(__name__)


class SessionSource(Protocol):
    """The session pool, as the pipeline sees it."""

    @property
    def accounts(self) -> tuple[str | None, ...]: ...

    def claim(
        self,
        timeout: float,
        *,
        session_key: str | None = None,
        session_id: str | None = None,
        account: str | None = None,
    ) -> Lease: ...


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
        self.sender = Sender(settings, store, clock=clock, sleep=sleep)
        self.finisher = Finisher(settings, store, clock=clock)
        self.fill_rule = FillRule(
            filled=settings.fill_ratio_filled,
            partial=settings.fill_ratio_partial,
            order_timeout_seconds=settings.order_timeout_seconds,
        )

    # --- entry points ------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> Outcome:
        """Never raises: database or terminal trouble becomes a requeue, except on the
        last deliveries before the queue's limit (see ``_last_chance``)."""
        outcome = self._guarded(lambda context: self._handle(delivery, context))
        if isinstance(outcome, Requeue) and self._near_limit(delivery):
            return self._guarded(lambda context: self._last_chance(delivery, outcome, context))
        return outcome

    def _near_limit(self, delivery: Delivery) -> bool:
        """One of the last ``delivery_last_chances`` deliveries before the queue dead-letters
        the message. ``x-delivery-count`` is absent on the first delivery, then counts the
        earlier deliveries returned to the queue; a quorum queue with ``x-delivery-limit`` L
        delivers a message L + 1 times (counts absent, 1 .. L), so the last has count L."""
        # a first delivery carries no broker-set count: a header there is the publisher's
        count = (delivery.delivery_count or 0) if delivery.redelivered else 0
        limit = self.settings.delivery_limit
        return count > limit - self.settings.delivery_last_chances

    def _last_chance(self, delivery: Delivery, requeue: Requeue, context: ExitStack) -> Outcome:
        """Requeued again, the approval would be dead-lettered by the queue with no row and
        no confirmation (issue 18 item 7). Instead: a REJECTED row and its confirmation when
        no order was sent for it (SESSION_UNAVAILABLE, the requeue's cause in the details);
        the recorded answer when the key has one; a dead letter with a reason otherwise
        (a row in flight is settled by the recovery sweep, which publishes its answer)."""
        run = Run(self.clock, self.clock())
        try:
            request = parse_request(
                delivery.body,
                delivery.properties,
                received_at=delivery.received_at,
                max_body_bytes=self.settings.max_body_bytes,
                parse_timeout_seconds=self.settings.parse_timeout_seconds,
            )
        except InvalidMessage as invalid:
            return DeadLetter(invalid.code, f"{invalid.field}: {invalid.detail}")
        context.enter_context(
            log_context(
                execution_id=request.execution_id,
                order_id=request.rpm_order_id,
                symbol=request.symbol,
            )
        )
        details = (
            f"not handled in {(delivery.delivery_count or 0) + 1} deliveries: {requeue.reason}"
        )
        log.warning("last delivery before the limit: answering (%s)", requeue.reason)
        try:
            with self.store.connection() as conn:
                row = self.store.load(conn, request.execution_id)
                if row is None:
                    stale = self._staleness(request)
                    reason, why = stale or (RejectionReason.SESSION_UNAVAILABLE, details)
                    answered = self.finisher.reject(conn, request, reason, why, run)
                    if not isinstance(answered, Requeue):
                        return answered
                    row = self.store.load(conn, request.execution_id)
                if row is not None and row.answered:
                    return self.finisher.recorded(conn, row)
        except (psycopg.Error, StoreError) as exc:
            return DeadLetter("DATABASE_UNAVAILABLE", f"{details}; {type(exc).__name__}")
        return DeadLetter(
            "IN_FLIGHT",
            f"{details}; the execution is in flight: the recovery sweep settles it and"
            " publishes its confirmation",
        )

    def resume(self, row: ExecutionRow) -> Outcome:
        """Settle an in-flight row from the broker's truth (recovery sweep, ``reconcile``)."""
        return self._guarded(lambda context: self._resume(row, context))

    def _guarded(self, work: Callable[[ExitStack], Outcome]) -> Outcome:
        """Run ``work``, turning trouble into a requeue. ``work`` enters a ``log_context``
        on the stack as soon as it knows the execution and the session: the stack is closed
        only after the error is logged, so that line carries them too."""
        with ExitStack() as context:
            try:
                return work(context)
            except (psycopg.Error, StoreError) as exc:
                log.warning("database unavailable, requeued: %s", type(exc).__name__)
                return Requeue(f"database: {type(exc).__name__}")
            except LeaseLost as exc:
                # fenced before an order_send or a commit (the intent's and the final's
                # statements name the lock): nothing was sent or committed by this handling
                # since the lock was lost; the row stays as it is and its holder settles it
                log.warning("session lease lost, requeued: %s", exc)
                return Requeue("session lease lost")
            except api.TransportError as exc:
                # the terminal failed mid-way (SessionLost, a dropped bridge, an unconfirmed
                # cancel): any row stays in flight and is settled later from the broker's truth
                log.warning("terminal unavailable, requeued: %s", exc)
                return Requeue(f"terminal: {type(exc).__name__}")
            except Exception:
                log.exception("unexpected error, requeued")
                return Requeue("internal error")

    def _claim_for_row(self, row: ExecutionRow, context: ExitStack) -> Lease | Requeue:
        """The lease of the session the row names (by identity: the same account in every
        process), with the row's and then the session's fields in the log context."""
        context.enter_context(
            log_context(
                execution_id=row.execution_id,
                order_id=row.get("rpm_order_id"),
                symbol=row.get("symbol"),
            )
        )
        try:
            lease = self.sessions.claim(
                self.settings.claim_timeout_seconds,
                session_key=row.get("session_key"),  # the account's identity, in every process
                session_id=row.get("session_id"),  # rows from before session_key
            )
        except ClaimTimeout:
            return Requeue("no MT5 session available")
        context.enter_context(log_context(session=lease.session.id))
        return lease

    def _resume(self, row: ExecutionRow, context: ExitStack) -> Outcome:
        lease = self._claim_for_row(row, context)
        if isinstance(lease, Requeue):
            return lease
        with lease:
            # read under the row's session lease: the state its last holder left
            current = self.store.load(lease.conn, row.execution_id)
            if current is None:
                return Requeue("row vanished")
            if current.answered:
                return self.finisher.recorded(lease.conn, current)
            run = Run(self.clock, self.clock())
            return self._settle(
                plan_from_row(current, self.settings.magic), lease, run, resumed=True
            )

    def recheck(self, row: ExecutionRow) -> Outcome:
        """Ask the broker again about an UNKNOWN row (the background reconciler).

        Publish: a corrected confirmation (a new version) is committed in the outbox: the
        broker now shows fills that differ from the provisional answer, or the window
        (``unknown_reconcile_hours``) ended and the provisional answer became final.
        Requeue: still unknown (asked again after a backoff) or nothing could be asked.
        """
        return self._guarded(lambda context: self._recheck(row, context))

    def _recheck(self, row: ExecutionRow, context: ExitStack) -> Outcome:
        lease = self._claim_for_row(row, context)
        if isinstance(lease, Requeue):
            return lease
        with lease:
            current = self.store.load(lease.conn, row.execution_id)
            if current is None or current.state != UNKNOWN_STATE:
                return Requeue("no longer unknown")
            published = self.store.confirmation_of(lease.conn, current.execution_id)
            if published is None:
                raise StoreError(f"unknown execution {current.execution_id} has no outbox row")
            previous = ExecutionConfirmation.model_validate_json(published.payload)
            plan = plan_from_row(current, self.settings.magic)
            run = Run(self.clock, self.clock())
            run.attempts, run.submitted_at = plan.attempts, plan.submitted_at
            gateway: Gateway = lease.session.gateway
            with run.stage("reconcile"):
                found = inquiry.reconcile(gateway, plan, 0.0, self.sleep)
            run.broker_calls("reconcile", gateway.drain_calls())
            fills: list[Fill] | None = []
            if found.found:
                fills = (
                    None if found.open_orders else inquiry.shown_fills(gateway, plan, found, run)
                )
            version = previous.version + 1
            if fills is not None and settle.differs(fills, previous):
                run.note("recheck", corrected=True, deals=[d for f in fills for d in f.deals])
                correction = (
                    f"version {previous.version} was provisional ({previous.status.value},"
                    f" {previous.rejection_reason.value if previous.rejection_reason else '-'});"
                    " the broker now shows this execution's deals"
                )
                return self._finish(plan, lease, run, fills, version=version, correction=correction)
            window = timedelta(hours=self.settings.unknown_reconcile_hours)
            if fills is not None and datetime.now(UTC) >= previous.completed_at + window:
                run.note("recheck", final=True)
                correction = (
                    f"final: the broker showed nothing more of this execution within"
                    f" {self.settings.unknown_reconcile_hours:g} h"
                )
                return self._finish(
                    plan,
                    lease,
                    run,
                    fills,
                    status=previous.status,
                    reason=previous.rejection_reason,
                    details=previous.rejection_details,
                    version=version,
                    correction=correction,
                )
            attempts = int(current.get("reconcile_attempts") or 0)
            delay = min(
                self.settings.unknown_reconcile_first_seconds * 2 ** min(attempts + 1, 30),
                self.settings.unknown_reconcile_max_seconds,
            )
            run.note("recheck", still_unknown=True, next_in_seconds=delay)
            self.store.reconcile_later(lease.conn, current.execution_id, delay, run.take_events())
            return Requeue("outcome still unknown")

    # --- the path of one delivery ------------------------------------------------------

    def _handle(self, delivery: Delivery, context: ExitStack) -> Outcome:
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
            context.enter_context(
                log_context(
                    execution_id=execution_id_for(invalid.idempotency_key),
                    order_id=invalid.rpm_order_id,
                )
            )
            return self.finisher.reject_invalid(invalid, delivery, run)
        metrics.record_received("valid", redelivered=delivery.redelivered)
        context.enter_context(
            log_context(
                execution_id=request.execution_id,
                order_id=request.rpm_order_id,
                symbol=request.symbol,
            )
        )

        accounts = self.sessions.accounts
        routed = checks.route(request.account, accounts)
        refusal = checks.refusal(request)
        if refusal is None and not isinstance(routed, checks.Routed):
            refusal = routed
        if refusal is not None:
            # decided by the message alone: no session; an existing row is kept
            with self.store.connection() as conn:
                return self.finisher.reject(conn, request, *refusal, run)
        assert isinstance(routed, checks.Routed)
        account = routed.account

        stale = self._staleness(request)
        if stale is not None:
            # judged before claiming: a stale approval is answered even with no session
            recorded = self._reject_stale(request, stale, run)
            if recorded is not None:
                return recorded
        with run.stage("claim"):
            try:
                lease = self.sessions.claim(self.settings.claim_timeout_seconds, account=account)
            except ClaimTimeout:
                return self._account_busy(request, account, len(accounts) > 1, run)
        with lease:
            context.enter_context(log_context(session=lease.session.id))
            # a redelivery most likely has a row; a first delivery is loaded only if its
            # intent conflicts (see the module's docstring)
            row = None
            if delivery.redelivered:
                row = self.store.load(lease.conn, request.execution_id)
            if row is None:
                stale = self._staleness(request)
                if stale is not None:
                    return self.finisher.reject(lease.conn, request, *stale, run)
                executed = self._execute(request, lease, run)
                if executed is not None:
                    return executed
                row = self.store.load(lease.conn, request.execution_id)
                if row is None:
                    return Requeue("the execution's row vanished")
            if row.answered:
                return self.finisher.recorded(lease.conn, row)
            if row.get("session_key") == lease.session.spec.identity:
                return self._settle(
                    plan_from_row(row, self.settings.magic), lease, run, resumed=True
                )
        # in flight on another session: it is settled on the account it was sent to
        return self.resume(row)

    def _reject_stale(
        self, request: ExecutionRequest, stale: checks.Refusal, run: Run
    ) -> Outcome | None:
        """A stale approval without a session: REJECTED (insert-only), or the key's recorded
        answer. None: the key's row is in flight, settled on its session."""
        with self.store.connection() as conn:
            answered = self.finisher.reject(conn, request, *stale, run)
            if not isinstance(answered, Requeue):
                return answered
            row = self.store.load(conn, request.execution_id)
            if row is not None and row.answered:
                return self.finisher.recorded(conn, row)
        return None

    def _account_busy(
        self, request: ExecutionRequest, account: str | None, several: bool, run: Run
    ) -> Outcome:
        """No session of the approval's account came free within the claim timeout.

        With several accounts the delivery goes to the back of the queue (``to_back``), so
        that other accounts' approvals queued behind it reach their free sessions; the claim
        timeout bounds how long it held a prefetch slot. A back-of-queue copy is a new
        message (no delivery limit): an approval past its TTL is refused here instead
        (insert-only, as after a claim: a key with a row keeps it), which ends the loop.
        """
        if not several:
            return Requeue("no MT5 session available")
        stale = self._staleness(request)
        if stale is not None:
            with self.store.connection() as conn:
                return self.finisher.reject(conn, request, *stale, run)
        return Requeue(f"no MT5 session of account {account} available", to_back=True)

    def _staleness(self, request: ExecutionRequest | Plan) -> checks.Refusal | None:
        ttl = self.settings.approval_ttl_seconds
        return checks.staleness(request.decided_at, self.clock(), ttl)

    def _execute(self, request: ExecutionRequest, lease: Lease, run: Run) -> Outcome | None:
        """Validate, commit the intent, send. None: the key already has a row (no order)."""
        trade = request.trade
        assert trade is not None  # checks.refusal guarantees an approved trade
        gateway: Gateway = lease.session.gateway
        try:
            with run.stage("validate"):
                valid = checks.validate(gateway, self.settings, trade)
        except GatewayRejection as rejection:
            run.broker_calls("validate", gateway.drain_calls())
            return self.finisher.reject(
                lease.conn,
                request,
                rejection.reason,
                rejection.details,
                run,
                retcode=rejection.retcode,
                session=lease,
            )
        run.broker_calls("validate", gateway.drain_calls())
        run.event("validate", "VALIDATED", spread_pips=valid.snapshot.spread_pips)
        plan = plan_for(
            request,
            broker_symbol=valid.broker_symbol,
            lots=valid.lots,
            legs=valid.legs,
            requested_price=valid.price,
            deviation=valid.deviation,
            spread_pips=valid.snapshot.spread_pips,
            spec=valid.spec,
            deployment_magic=self.settings.magic,
        )
        plan.arrival_bid, plan.arrival_ask = valid.snapshot.bid, valid.snapshot.ask
        if not self.sender.commit_intent(plan, request, lease, run):
            return None
        return self._submit(plan, valid.spec, lease, run)

    # --- submit, settle, finish --------------------------------------------------------

    def _submit(
        self,
        plan: Plan,
        spec: SymbolSpec,
        lease: Lease,
        run: Run,
        *,
        known: Sequence[Fill] = (),
        first_leg: int = 0,
    ) -> Outcome:
        """Send the legs from ``first_leg`` on; ``known``: fills of the legs before it."""
        sent = self.sender.send(plan, spec, lease, run, first_leg=first_leg)
        fills = [*known, *sent.fills]
        if sent.unknown:
            assert sent.stopped_at is not None
            return self._settle(
                plan, lease, run, resumed=False, spec=spec, known=fills, first_leg=sent.stopped_at
            )
        if not fills and sent.refused is not None:
            refused = sent.refused
            return self._finish(
                plan, lease, run, [], reason=refused.reason, details=refused.details, spec=spec
            )
        if not fills and sent.rejected is not None:
            reason, details = settle.rejection_of(sent.rejected)
            return self._finish(plan, lease, run, [], reason=reason, details=details, spec=spec)
        return self._finish(plan, lease, run, fills, timed_out=sent.timed_out, spec=spec)

    def _settle(
        self,
        plan: Plan,
        lease: Lease,
        run: Run,
        *,
        resumed: bool,
        spec: SymbolSpec | None = None,
        known: Sequence[Fill] = (),
        first_leg: int = 0,
    ) -> Outcome:
        """The outcome is unknown (lost reply, crash, redelivery): ask the broker.

        Found -> finish from the broker's deals (monitoring a still-pending order). Not found,
        even after a grace period for a terminal still processing -> the order never reached
        the broker; it is sent again with the same comment token, if the approval is still
        fresh and attempts remain. A terminal that cannot answer leaves the row in flight.

        ``known``: fills of this handling's earlier legs, which the broker's answer may not
        show yet; they are kept, and a resend starts at ``first_leg`` (never a filled leg).
        """
        gateway: Gateway = lease.session.gateway
        if resumed:  # the audit keeps what earlier deliveries did
            run.attempts = max(run.attempts, plan.attempts)
            run.submitted_at = run.submitted_at or plan.submitted_at
        try:
            with run.stage("reconcile"):
                found = inquiry.reconcile(
                    gateway, plan, self.settings.reconcile_grace_seconds, self.sleep
                )
        except (GatewayRejection, api.TransportError) as exc:
            run.broker_calls("reconcile", gateway.drain_calls())
            run.note("reconcile", error=str(exc)[:200])
            save_events(self.store, lease.conn, plan.execution_id, run)
            return Requeue("outcome unknown and the terminal cannot be asked")
        run.broker_calls("reconcile", gateway.drain_calls())
        run.note("reconcile", found=found.found, resumed=resumed, deals=len(found.deals))
        if found.found:
            return self._settle_found(plan, found, lease, run, known)

        decision = settle.when_not_found(
            self._staleness(plan),
            run.submissions,
            self.settings.max_send_attempts,
            filled=bool(known),
        )
        if not isinstance(decision, Resend):
            # an order may be out (the intent is on record): the broker showing nothing is
            # no proof, so the answer is provisional and the row is reconciled in the
            # background until a fill appears or the window ends (issue 18 item 3)
            return self._finish(
                plan,
                lease,
                run,
                known,
                reason=decision.reason,
                details=decision.details,
                status=decision.status,
                provisional=True,
            )
        run.note("reconcile", resend=True, first_leg=first_leg)
        try:
            spec = spec or gateway.symbol_spec(plan.broker_symbol)
        except GatewayRejection as rejection:
            run.broker_calls("reconcile", gateway.drain_calls())
            return self._finish(
                plan, lease, run, known, reason=rejection.reason, details=rejection.details
            )
        return self._submit(plan, spec, lease, run, known=known, first_leg=first_leg)

    def _settle_found(
        self, plan: Plan, found: settle.Found, lease: Lease, run: Run, known: Sequence[Fill]
    ) -> Outcome:
        """The broker knows the execution: finish from its deals, monitoring pending orders."""
        gateway: Gateway = lease.session.gateway
        found, shown = inquiry.until_deals_show(
            gateway,
            plan,
            found,
            run,
            timeout=self.settings.order_timeout_seconds,
            clock=self.clock,
            sleep=self.sleep,
        )
        fills = settle.with_known(known, shown)
        closed = self._closed(plan, found, lease, run)
        timed_out = False
        for order in found.open_orders:
            requested = plan.requested_price or order.price_open
            fill, leg_timed_out = self.sender.monitor(gateway, order.ticket, requested, run, lease)
            timed_out = timed_out or leg_timed_out
            fills = settle.with_monitored(fills, order.ticket, fill)
        return self._finish(plan, lease, run, fills, timed_out=timed_out, closed=closed)

    def _closed(self, plan: Plan, found: settle.Found, lease: Lease, run: Run) -> list[Fill]:
        """Our slippage close's fills the broker shows (an earlier handling sent them).

        A close on record (``closing_sent``) that shows nothing yet is asked again after the
        grace period, like an order; a closing order pending or without its deals keeps the
        execution in flight (TransportError), so the close is never sent twice."""
        if not plan.closing_sent:
            return settle.closing_fills(found.deals, plan.side)
        gateway: Gateway = lease.session.gateway
        opposite = plan.side.opposite
        if not any(order.side is opposite for order in found.history_orders):
            if any(order.side is opposite for order in found.open_orders):
                raise api.TransportError("the slippage close is still pending")
            self.sleep(self.settings.reconcile_grace_seconds)
            with run.stage("reconcile"):
                found = inquiry.reconcile(gateway, plan, 0.0, self.sleep)
            run.broker_calls("reconcile", gateway.drain_calls())
        if any(order.side is opposite for order in found.open_orders):
            raise api.TransportError("the slippage close is still pending")
        closed = settle.closing_fills(found.deals, plan.side)
        missing = settle.uncovered(found, closed, opposite)
        if missing:
            asked = inquiry.deals_of_orders(gateway, missing, run)
            closed = settle.with_known(closed, settle.closing_fills(asked, plan.side))
            if settle.uncovered(found, closed, opposite):
                raise api.TransportError("the slippage close's deals are not visible yet")
        run.note("slippage", closed_before=[fill.order for fill in closed])
        return closed

    def _finish(
        self,
        plan: Plan,
        lease: Lease,
        run: Run,
        fills: Sequence[Fill],
        *,
        timed_out: bool = False,
        reason: RejectionReason | None = None,
        details: str | None = None,
        status: ExecutionStatus | None = None,
        spec: SymbolSpec | None = None,
        closed: Sequence[Fill] = (),
        provisional: bool = False,
        version: int = 1,
        correction: str | None = None,
    ) -> Outcome:
        """``closed``: our slippage close's fills already done; ``provisional``: the outcome
        is unknown (see ``_settle``)."""
        gateway: Gateway = lease.session.gateway
        if plan.contract_size <= 0 or plan.pip <= 0:  # a row from before these were kept
            spec = spec or gateway.symbol_spec(plan.broker_symbol)
            plan.contract_size, plan.pip = spec.contract_size, spec.pip
        counted = settle.tally(fills, plan.side, plan.pip, plan.requested_price)
        if counted.slippage_pips is not None:
            metrics.record_slippage(plan.symbol, plan.side.name.lower(), counted.slippage_pips)
            metrics.record_shortfall(
                plan.symbol,
                plan.side.value,
                plan.arrival_bid,
                plan.arrival_ask,
                counted.fill_price,
                plan.pip,
            )
        if status is None:
            if counted.executed_lots > 0:
                metrics.observe_fill_ratio(
                    settle.fill_ratio(counted.executed_lots, plan.intended_lots)
                )
            verdict = settle.classify(
                counted.executed_lots,
                plan.intended_lots,
                self.fill_rule,
                timed_out=timed_out,
                reason=reason,
                details=details,
            )
        else:
            verdict = settle.Verdict(status, reason, details)
        breach = settle.slippage_breach(counted, self.settings.slippage_limit_for(plan.symbol))
        if breach is not None:
            metrics.record_slippage_breach(plan.symbol)
            # a correction (version > 1) only reports: the row is no longer in flight
            if self.settings.slippage_policy == "close" and version == 1:
                spec = spec or gateway.symbol_spec(plan.broker_symbol)
                fills, closed_all = self.sender.close(plan, spec, fills, lease, run, closed=closed)
                verdict = settle.after_close(verdict, breach, closed_all)
            else:
                verdict = settle.flagged(verdict, breach)
        return self.finisher.finish(
            plan,
            lease,
            run,
            fills,
            counted,
            verdict,
            provisional=provisional,
            version=version,
            correction=correction,
        )
