"""Finishing: the final audit row, its events and the confirmation's outbox row, committed
in one transaction; the confirmation is handed to the runtime only after that commit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from schemas.confirmation import ExecutionConfirmation
from schemas.enums import ExecutionStatus, RejectionReason
from schemas.identity import comment_token_for, execution_id_for, order_magic_for
from schemas.request import ExecutionRequest, InvalidMessage
from worker.config import Settings
from worker.execution.audit import Run
from worker.execution.outcome import Delivery, Outcome, Publish, Requeue
from worker.execution.plan import Plan, request_snapshot
from worker.execution.settle import Fill, Tally, Verdict
from worker.execution.submit import fenced_by
from worker.observability import metrics
from worker.pool.leases import Lease
from worker.store.store import UNKNOWN_STATE, ExecutionRow, Store, StoreError


class Finisher:
    """Commits final rows with their confirmations (thread-safe; state per call)."""

    def __init__(self, settings: Settings, store: Store, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock

    def finish(
        self,
        plan: Plan,
        lease: Lease,
        run: Run,
        fills: Sequence[Fill],
        counted: Tally,
        verdict: Verdict,
        *,
        provisional: bool = False,
        version: int = 1,
        correction: str | None = None,
        settling: dict[str, Any] | None = None,
        corrects: str = UNKNOWN_STATE,
    ) -> Outcome:
        """The final row of an execution that reached the intent.

        ``provisional``: the outcome is unknown; the row is left UNKNOWN (answered, and
        reconciled in the background). ``version`` > 1: a corrected confirmation of a row in
        state ``corrects`` (UNKNOWN, or a final row whose deals contradict its replies;
        ``correction`` says what changed), replacing its outbox row. ``settling``: what is
        left for the settler or the recheck (the row's ``settling``; None: nothing).
        """
        status, reason = verdict.status, verdict.reason
        executed_lots = counted.executed_lots
        run.event("commit", status.value, executed_lots=executed_lots)
        deals = [deal for fill in fills for deal in fill.deals]
        order = fills[0].order if fills else None
        position = next((fill.position for fill in fills if fill.position), None)
        completed = datetime.now(UTC)
        run.total()
        confirmation = ExecutionConfirmation(
            execution_id=plan.execution_id,
            order_id=plan.rpm_order_id,
            idempotency_key=plan.idempotency_key,
            status=status,
            rejection_reason=reason,
            rejection_details=verdict.details,
            symbol=plan.symbol,
            broker_symbol=plan.broker_symbol,
            direction=plan.side.value,
            intended_units=plan.intended_units,
            executed_units=round(executed_lots * plan.contract_size, 6),
            intended_lots=plan.intended_lots,
            executed_lots=executed_lots,
            requested_price=counted.requested_price,
            fill_price=counted.fill_price,
            spread_pips_at_submit=plan.spread_pips,
            slippage_pips=counted.slippage_pips,
            broker_order=order,
            broker_deals=deals,
            broker_position=position,
            retcode=run.retcode,
            broker_comment=run.broker_comment,
            attempts=run.attempts,
            session_id=lease.session.id,
            account_login=lease.session.login,
            account=lease.session.spec.account,
            timings_ms=dict(run.timings_ms),
            received_at=plan.received_at,
            submitted_at=run.submitted_at,
            completed_at=completed,
            version=version,
            provisional=provisional,
            correction=correction,
        )
        # a final answer's deal check goes to deal_checks (deleted once done), anything else
        # left to settle stays on the row (an UNKNOWN row's recheck reads it)
        check = settling if settling is not None and not provisional and version == 1 else None
        fields = terminal_fields(
            confirmation,
            plan.token,
            filling_mode=run.filling_mode,
            settling=None if check is not None else settling,
        )
        if provisional:
            first = self.settings.unknown_reconcile_first_seconds
            fields["state"] = UNKNOWN_STATE
            fields["next_reconcile_at"] = completed + timedelta(seconds=first)
        mine = publish_of(confirmation, plan.correlation_id, plan.reply_to)
        if version > 1:
            with run.stage("commit"):
                events = run.take_events()
                if self.store.correct(lease.conn, fields, events, mine, from_state=corrects):
                    metrics.record_correction(status.value)
                    return mine
            return self.recorded(lease.conn, self._row(lease, plan))
        with run.stage("commit"), fenced_by(lease) as lock:
            kept = self.store.finish(
                lease.conn, fields, run.take_events(), mine, lock=lock, check=check
            )
        return counted_outcome(
            kept, mine, status.value, reason.value if reason else None, confirmation.account
        )

    def _row(self, lease: Lease, plan: Plan) -> ExecutionRow:
        row = self.store.load(lease.conn, plan.execution_id)
        if row is None:
            raise StoreError(f"execution {plan.execution_id} vanished")
        return row

    def reject(
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
        run.total()
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
            account=session.session.spec.account if session else request.account,
            timings_ms=dict(run.timings_ms),
            received_at=request.received_at,
            completed_at=now,
        )
        fields = terminal_fields(
            confirmation,
            request.comment_token,
            magic=order_magic_for(request.execution_id, self.settings.magic),
            request=request_snapshot(request),
            decided_at=request.decided_at,
        )
        mine = publish_of(confirmation, request.correlation_id, request.reply_to)
        with run.stage("commit"):
            try:
                kept = self.store.finish(conn, fields, run.take_events(), mine, insert_only=True)
            except StoreError:
                return Requeue("a delivery of this key is in flight")
        return counted_outcome(kept, mine, "REJECTED", reason.value, confirmation.account)

    def reject_invalid(self, invalid: InvalidMessage, delivery: Delivery, run: Run) -> Outcome:
        """Invalid but keyed: a REJECTED confirmation (INVALID_REQUEST) on the record."""
        assert invalid.idempotency_key is not None
        key = invalid.idempotency_key
        execution_id = execution_id_for(key)
        details = f"{invalid.field}: {invalid.detail}"
        received = delivery.received_at.astimezone(UTC)
        symbol = invalid.symbol if invalid.symbol and routable(invalid.symbol) else None
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
        fields = terminal_fields(confirmation, comment_token_for(execution_id))
        mine = publish_of(confirmation, correlation, delivery.properties.reply_to or None)
        with self.store.connection() as conn:
            try:
                kept = self.store.finish(conn, fields, run.take_events(), mine, insert_only=True)
            except StoreError:
                return Requeue("a valid delivery of this key is in flight")
        return counted_outcome(kept, mine, "REJECTED", RejectionReason.INVALID_REQUEST.value)

    def recorded(self, conn: psycopg.Connection[Any], row: ExecutionRow) -> Outcome:
        """A terminal row: the same confirmation again, no broker call."""
        metrics.record_duplicate()
        published = self.store.confirmation_of(conn, row.execution_id)
        if published is None:
            raise StoreError(f"terminal execution {row.execution_id} has no outbox row")
        return published


def routable(symbol: str) -> bool:
    return symbol.isascii() and symbol.replace(".", "").replace("_", "").isalnum()


def terminal_fields(
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
        "account": c.account,
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


def publish_of(
    confirmation: ExecutionConfirmation, correlation_id: str | None, reply_to: str | None
) -> Publish:
    return Publish(
        execution_id=confirmation.execution_id,
        routing_key=confirmation.routing_key(),
        payload=confirmation.to_json_bytes(),
        correlation_id=correlation_id,
        reply_to=reply_to,
        version=confirmation.version,
    )


def counted_outcome(
    kept: Publish, mine: Publish, status: str, reason: str | None, account: str | None = None
) -> Publish:
    """Count the outcome just committed; a key's earlier outcome kept instead is a duplicate."""
    if kept is mine:
        metrics.record_outcome(status, reason, account)
    else:
        metrics.record_duplicate()
    return kept
