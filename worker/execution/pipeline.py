"""One delivery in, one outcome out: validate -> intent -> submit -> monitor -> fills -> audit.

The exactly-once protocol (DOMAIN.md 3):
- the execution id, the broker comment token and the confirmation's message id all derive
  from the idempotency key, so a redelivery is recognised by the store and by the broker;
- a terminal row answers a redelivery with the same confirmation, no broker call;
- the intent row (SUBMITTING) is committed through the session lease's connection BEFORE
  ``order_send``; an order is sent again only after a reply that proves the server did not
  take it (the gateway's requote / price changed / off quotes / too many requests / locked /
  frozen / invalid filling retries, before any other reply): an outcome that may have
  reached the server (None, 10011, 10012, 10031, a transport error, a handling that died
  between its intent and its reply) is never followed by a second order, whatever the
  settings; it is reconciled (magic, comment as a hint) until the broker shows the truth;
- a 10009/10010 reply that names its deal, volume and price is the fill (MqlTradeResult:
  "confirmed by broker"): settled at once, its deals checked later by the settler; any other
  order the server took (deal 0, placed) or an unknown outcome leaves its session at once
  (``settling`` on the row, ``Settling`` outcome: the delivery waits unacked) and the
  settler finishes it from the account's history, off the terminal;
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
- the broker showing nothing of an unknown outcome within the reconcile grace is no proof:
  the answer is provisional (row UNKNOWN, confirmation ``provisional``), rechecked in the
  background with backoff, and a corrected confirmation (same execution id, next
  ``version``) is committed when the broker shows every order of the execution, or a
  provisional one when it shows more fills than answered, or a final one when the window
  ends;
- a stale approval is refused before a session is claimed; on its last deliveries before the
  queue's limit an approval that would be requeued is answered (REJECTED, or its recorded
  answer) or dead-lettered with a reason, never left to the queue's silent dead letter.

Database trouble at any point requeues the delivery: before the intent commit no order was
sent, after it the in-flight row makes the redelivery hand it to the settler.

This module only orchestrates; the parts: ``checks`` (refusals before any send), ``plan``
(legs; a plan rebuilt from its row), ``submit`` (intent, send), ``settler`` (executions
waiting on the broker's history), ``recheck`` (UNKNOWN rows asked again in the background),
``inquiry`` (what the broker knows of one execution, gathered), ``settle`` (pure: broker
truth -> fills and final status), ``finish`` (final row + outbox), ``last_chance`` (the last
deliveries before the queue's limit), ``audit`` (events, stage timings, broker calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import Protocol

import psycopg

from schemas.identity import execution_id_for
from schemas.request import ExecutionRequest, InvalidMessage, parse_request
from worker.config import Settings
from worker.execution import checks, failover, last_chance, recheck, settle
from worker.execution.audit import Run
from worker.execution.conclude import Concluder
from worker.execution.finish import Finisher
from worker.execution.outcome import DeadLetter, Delivery, Outcome, Publish, Requeue, Settling
from worker.execution.plan import Plan, plan_for, plan_from_row
from worker.execution.settle import Awaited, FillRule
from worker.execution.settler import Settler, Waiter
from worker.execution.submit import Sender
from worker.mt5 import api
from worker.mt5.gateway import Gateway, GatewayRejection, SymbolSpec
from worker.observability import metrics
from worker.observability.logs import log_context
from worker.pool.leases import ClaimTimeout, Lease, LeaseLost
from worker.store.store import Event, ExecutionRow, Store, StoreError

log = logging.getLogger(__name__)


class SessionSource(Protocol):
    """The session pool, as the pipeline sees it."""

    @property
    def accounts(self) -> tuple[str | None, ...]: ...

    def has_session(self, session_key: str | None) -> bool: ...

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
        self.concluder = Concluder(settings, self.sender, self.finisher, self.fill_rule)
        # the one way an execution that reached the intent ends (the settler's, the
        # recheck's and the last chance's too)
        self.conclude = self.concluder.conclude
        self.settler = Settler(self, clock=clock)

    # --- entry points ------------------------------------------------------------------

    def handle(self, delivery: Delivery) -> Outcome:
        """Never raises: database or terminal trouble becomes a requeue, except on the
        last deliveries before the queue's limit (see :mod:`last_chance`)."""
        outcome = self._guarded(lambda context: self._handle(delivery, context))
        if isinstance(outcome, Requeue) and last_chance.near_limit(self.settings, delivery):
            return self._guarded(
                lambda context: last_chance.answer(self, delivery, outcome, context)
            )
        return outcome

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

    def claim_for_row(self, row: ExecutionRow, context: ExitStack) -> Lease | Requeue:
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
        lease = self.claim_for_row(row, context)
        if isinstance(lease, Requeue):
            return lease
        with lease:
            # read under the row's session lease: the state its last holder left
            current = self.store.load(lease.conn, row.execution_id)
            if current is None:
                return Requeue("row vanished")
            if current.answered:
                return self.finisher.recorded(lease.conn, current)
            return self._hand_over(current, lease)

    def _hand_over(self, row: ExecutionRow, lease: Lease) -> Outcome:
        """An in-flight row to the settler. A row the settler has not had yet (its handling
        stopped between the intent and the reply: the order may be out) is read as an
        unknown outcome of every leg: reconciled, never sent again. Its session's lease
        proves that no handling still works on it (a handling releases the lease only
        after the row is final or the settler's)."""
        if row.get("settling") is None:
            plan = plan_from_row(row, self.settings.magic)
            awaited = Awaited.from_json(None, legs=len(plan.legs), since=self.clock())
            self.store.update_in_flight(
                lease.conn,
                row.execution_id,
                {"settling": awaited.to_json()},
                [Event("settle", "transition", "SETTLING", detail={"resumed": True})],
            )
            row = replace(row, values={**row.values, "settling": awaited.to_json()})
        if not self.settler.add(Waiter.of_row(row, self.settings.magic, self.clock())):
            return Requeue("in flight on an account this process has no session of")
        return Settling(row.execution_id)

    def recheck(self, row: ExecutionRow) -> Outcome:
        """Ask the broker again about an UNKNOWN row (the background reconciler): Publish a
        corrected version, or Requeue (see :func:`recheck.recheck`)."""
        return self._guarded(lambda context: recheck.recheck(self, row, context))

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

        # after a database switch: its orders may be on the books with its row lost; such
        # an approval is settled from them, never refused (stale) nor sent again
        found_on = failover.find_before_claim(self, request, run)
        if isinstance(found_on, Requeue):
            return found_on
        stale = self.staleness(request) if found_on is None else None
        if stale is not None:
            # judged before claiming: a stale approval is answered even with no session
            recorded = self._reject_stale(request, stale, run)
            if recorded is not None:
                return recorded
        with run.stage("claim"):
            try:
                lease = self.sessions.claim(
                    self.settings.claim_timeout_seconds, account=account, session_id=found_on
                )
            except ClaimTimeout:
                if found_on is not None:
                    return Requeue(f"no MT5 session {found_on} available")
                return self._account_busy(request, account, len(accounts) > 1, run)
        with lease:
            context.enter_context(log_context(session=lease.session.id))
            # a redelivery most likely has a row; a first delivery is loaded only if its
            # intent conflicts (see the module's docstring)
            row = None
            if delivery.redelivered:
                row = self.store.load(lease.conn, request.execution_id)
            if row is None:
                stale = self.staleness(request) if found_on is None else None
                if stale is not None:
                    return self.finisher.reject(lease.conn, request, *stale, run)
                executed = self._execute(request, lease, run, adopt=found_on is not None)
                if executed is not None:
                    return executed
                row = self.store.load(lease.conn, request.execution_id)
                if row is None:
                    return Requeue("the execution's row vanished")
            if row.answered:
                return self.finisher.recorded(lease.conn, row)
            if row.get("settling") is not None or row.get("session_key") == (
                lease.session.spec.identity
            ):
                return self._hand_over(row, lease)
        # in flight on another session without the settler: handed over under its lease
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
        stale = self.staleness(request)
        if stale is not None:
            with self.store.connection() as conn:
                return self.finisher.reject(conn, request, *stale, run)
        return Requeue(f"no MT5 session of account {account} available", to_back=True)

    def staleness(self, request: ExecutionRequest | Plan) -> checks.Refusal | None:
        ttl = self.settings.approval_ttl_seconds
        return checks.staleness(request.decided_at, self.clock(), ttl)

    def _execute(
        self, request: ExecutionRequest, lease: Lease, run: Run, *, adopt: bool = False
    ) -> Outcome | None:
        """Validate, commit the intent, send. None: the key already has a row (no order)."""
        trade = request.trade
        assert trade is not None  # checks.refusal guarantees an approved trade
        gateway: Gateway = lease.session.gateway
        try:
            with run.stage("validate"):
                valid = checks.validate(gateway, self.settings, trade)
        except GatewayRejection as rejection:
            run.broker_calls("validate", gateway.drain_calls())
            if adopt:  # its order is on the books: a refusal of a new order says nothing
                return Requeue(f"after a database switch, validation: {rejection.reason.value}")
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
        if adopt:  # on the broker's books before a database switch lost its row: settle it
            return None
        return self._submit(plan, valid.spec, lease, run)

    # --- submit, settle, finish --------------------------------------------------------

    def _submit(self, plan: Plan, spec: SymbolSpec, lease: Lease, run: Run) -> Outcome:
        """Send the legs; settle at once from replies that name their deals, else wait."""
        sent = self.sender.send(plan, spec, lease, run)
        if sent.waits:
            awaited = Awaited(
                legs_sent=sent.legs_sent,
                orders=tuple(sent.orders),
                known=tuple(sent.fills),
                unknown=sent.unknown,
                since=self.clock(),
                requested=tuple(sent.requested),
            )
            return self._wait(plan, lease, run, awaited)
        if not sent.fills and sent.refused is not None:
            refused = sent.refused
            return self.conclude(
                plan, lease, run, [], reason=refused.reason, details=refused.details, spec=spec
            )
        if not sent.fills and sent.rejected is not None:
            reason, details = settle.rejection_of(sent.rejected)
            return self.conclude(plan, lease, run, [], reason=reason, details=details, spec=spec)
        # the replies' fills are checked against the deals later (the slippage close's own
        # fills are on the record beside them: that path is settled from its deals instead)
        check = Awaited(
            legs_sent=sent.legs_sent, known=tuple(sent.fills), since=self.clock()
        ).checking()
        checks = bool(sent.fills) and self.settings.slippage_policy != "close"
        settling = check.to_json() if checks else None
        outcome = self.conclude(plan, lease, run, sent.fills, spec=spec, settling=settling)
        if checks and isinstance(outcome, Publish) and outcome.version == 1:
            self.settler.add(
                Waiter(
                    plan,
                    check,
                    account=lease.session.spec.account,
                    session_key=lease.session.spec.identity,
                )
            )
        return outcome

    def _wait(self, plan: Plan, lease: Lease, run: Run, awaited: Awaited) -> Outcome:
        """Leave the execution to the settler and release the session: the row (SUBMITTED,
        ``settling``) is committed first, through the lease's connection."""
        named = [*awaited.orders, *(fill.order for fill in awaited.known)]
        run.event(
            "submit", "SETTLING", orders=list(awaited.orders), unknown=awaited.unknown or None
        )
        document = {**awaited.to_json(), "timings": dict(run.timings_ms)}
        fields = {
            "state": "SUBMITTED",
            "broker_order": named[0] if named else None,
            "settling": document,
            "attempts": run.attempts,
            "retcode": run.retcode,
            "broker_comment": run.broker_comment,
            "filling_mode": run.filling_mode,
        }
        self.store.update_in_flight(lease.conn, plan.execution_id, fields, run.take_events())
        plan.attempts = run.attempts
        waiter = Waiter(
            plan,
            awaited,
            account=lease.session.spec.account,
            session_key=lease.session.spec.identity,
            carried={**fields, "timings": dict(run.timings_ms), "submitted_at": run.submitted_at},
        )
        if not self.settler.add(waiter):  # pragma: no cover - the lease's own account
            return Requeue("no session of the execution's account")
        return Settling(plan.execution_id)
