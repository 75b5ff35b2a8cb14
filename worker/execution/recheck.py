"""The background recheck of UNKNOWN rows: the broker showed nothing of an unknown outcome
within the reconcile grace, so the answer was provisional (row UNKNOWN, confirmation
``provisional``). The service's reconciler calls ``Pipeline.recheck`` for each due row;
:func:`recheck` asks the broker again under the row's session lease and commits a corrected
confirmation (same execution id, next ``version``) when the broker shows every order of the
execution, a provisional one when it shows more fills than answered, a final one when the
window (``unknown_reconcile_hours``) ends; else it backs off. Never a second order.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from schemas.confirmation import ExecutionConfirmation
from schemas.enums import RejectionReason
from worker.execution import inquiry, settle
from worker.execution.audit import Run
from worker.execution.outcome import Outcome, Requeue
from worker.execution.plan import plan_from_row
from worker.execution.settle import Awaited, Settled
from worker.mt5.gateway import Gateway
from worker.store.store import UNKNOWN_STATE, ExecutionRow, StoreError

if TYPE_CHECKING:
    from worker.execution.pipeline import Pipeline


def recheck(pipeline: Pipeline, row: ExecutionRow, context: ExitStack) -> Outcome:
    """Ask the broker again about an UNKNOWN row (the background reconciler).

    Publish: a new version is committed in the outbox: final when the broker shows every
    order of the execution (and the deals of what they executed) or the window
    (``unknown_reconcile_hours``) ended; provisional when it shows other fills than
    answered while an order is still unaccounted for (a split plan's unknown leg).
    Requeue: still unknown (asked again after a backoff) or nothing could be asked.
    """
    settings, store = pipeline.settings, pipeline.store
    lease = pipeline.claim_for_row(row, context)
    if isinstance(lease, Requeue):
        return lease
    with lease:
        current = store.load(lease.conn, row.execution_id)
        if current is None or current.state != UNKNOWN_STATE:
            return Requeue("no longer unknown")
        published = store.confirmation_of(lease.conn, current.execution_id)
        if published is None:
            raise StoreError(f"unknown execution {current.execution_id} has no outbox row")
        previous = ExecutionConfirmation.model_validate_json(published.payload)
        plan = plan_from_row(current, settings.magic)
        awaited = Awaited.from_json(current.get("settling"), legs=len(plan.legs), since=0.0)
        run = Run(pipeline.clock, pipeline.clock())
        run.attempts, run.submitted_at = plan.attempts, plan.submitted_at
        gateway: Gateway = lease.session.gateway
        with run.stage("reconcile"):
            found = inquiry.reconcile(gateway, plan, 0.0, pipeline.sleep)
        run.broker_calls("reconcile", gateway.drain_calls())
        state = settle.progress(awaited, found, plan.side, plan.requested_price)
        version = previous.version + 1
        was = (
            f"version {previous.version} was provisional ({previous.status.value},"
            f" {previous.rejection_reason.value if previous.rejection_reason else '-'})"
        )
        if isinstance(state, Settled):
            run.note("recheck", corrected=True, deals=[d for f in state.fills for d in f.deals])
            return pipeline.conclude(
                plan,
                lease,
                run,
                state.fills,
                timed_out=state.timed_out,
                version=version,
                correction=f"{was}; the broker now shows every order of this execution",
            )
        window = timedelta(hours=settings.unknown_reconcile_hours)
        working = isinstance(state, settle.Waiting) and bool(state.open_orders)
        if not working and datetime.now(UTC) >= previous.completed_at + window:
            run.note("recheck", final=True)
            correction = (
                f"final: the broker showed nothing more of this execution within"
                f" {settings.unknown_reconcile_hours:g} h"
            )
            return pipeline.conclude(
                plan,
                lease,
                run,
                state.fills,
                status=previous.status,
                reason=previous.rejection_reason,
                details=previous.rejection_details,
                version=version,
                correction=correction,
            )
        if settle.differs(state.fills, previous):
            # more is known, but an order is still unaccounted for: still provisional
            run.note("recheck", corrected=True, provisional=True)
            return pipeline.conclude(
                plan,
                lease,
                run,
                state.fills,
                reason=RejectionReason.UNKNOWN_OUTCOME,
                details="an order of this execution has an unknown outcome",
                provisional=True,
                version=version,
                correction=f"{was}; the broker now shows more of this execution",
                settling=awaited.to_json(),
            )
        attempts = int(current.get("reconcile_attempts") or 0)
        delay = min(
            settings.unknown_reconcile_first_seconds * 2 ** min(attempts + 1, 30),
            settings.unknown_reconcile_max_seconds,
        )
        run.note("recheck", still_unknown=True, next_in_seconds=delay)
        store.reconcile_later(lease.conn, current.execution_id, delay, run.take_events())
        return Requeue("outcome still unknown")
