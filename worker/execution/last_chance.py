"""The last deliveries before the queue's limit: an approval that would be requeued again is
answered (REJECTED, or its recorded answer) or dead-lettered with a reason, never left to the
queue's silent dead letter (issue 18 item 7). An approval decided before a database switch
whose broker could not be asked is never answered REJECTED: its row may have been lost with
its order on the books (``worker.execution.failover``); it is dead-lettered as in doubt.
``Pipeline.handle`` asks :func:`near_limit` after a requeue and then hands the delivery to
:func:`answer`.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING

import psycopg

from schemas.enums import RejectionReason
from schemas.identity import order_magic_for
from schemas.request import ExecutionRequest, InvalidMessage, parse_request
from worker.config import Settings
from worker.execution.audit import Run
from worker.execution.outcome import DeadLetter, Delivery, Outcome, Requeue
from worker.observability.logs import log_context
from worker.store.store import StoreError

if TYPE_CHECKING:
    from worker.execution.pipeline import Pipeline

log = logging.getLogger(__name__)


def near_limit(settings: Settings, delivery: Delivery) -> bool:
    """One of the last ``delivery_last_chances`` deliveries before the queue dead-letters
    the message. ``x-delivery-count`` is absent on the first delivery, then counts the
    earlier deliveries returned to the queue; a quorum queue with ``x-delivery-limit`` L
    delivers a message L + 1 times (counts absent, 1 .. L), so the last has count L."""
    # a first delivery carries no broker-set count: a header there is the publisher's
    count = (delivery.delivery_count or 0) if delivery.redelivered else 0
    limit = settings.delivery_limit
    return count > limit - settings.delivery_last_chances


def answer(pipeline: Pipeline, delivery: Delivery, requeue: Requeue, context: ExitStack) -> Outcome:
    """Requeued again, the approval would be dead-lettered by the queue with no row and
    no confirmation (issue 18 item 7). Instead: a REJECTED row and its confirmation when
    no order was sent for it (SESSION_UNAVAILABLE, the requeue's cause in the details);
    the recorded answer when the key has one; a dead letter with a reason otherwise
    (a row in flight is settled by the recovery sweep, which publishes its answer)."""
    settings, store, finisher = pipeline.settings, pipeline.store, pipeline.finisher
    run = Run(pipeline.clock, pipeline.clock())
    try:
        request = parse_request(
            delivery.body,
            delivery.properties,
            received_at=delivery.received_at,
            max_body_bytes=settings.max_body_bytes,
            parse_timeout_seconds=settings.parse_timeout_seconds,
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
    details = f"not handled in {(delivery.delivery_count or 0) + 1} deliveries: {requeue.reason}"
    log.warning("last delivery before the limit: answering (%s)", requeue.reason)
    try:
        with store.connection() as conn:
            row = store.load(conn, request.execution_id)
            if row is None and store.epochs.suspect(request.decided_at):
                return _in_doubt(settings, request, details)
            if row is None:
                stale = pipeline.staleness(request)
                reason, why = stale or (RejectionReason.SESSION_UNAVAILABLE, details)
                answered = finisher.reject(conn, request, reason, why, run)
                if not isinstance(answered, Requeue):
                    return answered
                row = store.load(conn, request.execution_id)
            if row is not None and row.answered:
                return finisher.recorded(conn, row)
    except (psycopg.Error, StoreError) as exc:
        return DeadLetter("DATABASE_UNAVAILABLE", f"{details}; {type(exc).__name__}")
    return DeadLetter(
        "IN_FLIGHT",
        f"{details}; the execution is in flight: the recovery sweep settles it and"
        " publishes its confirmation",
    )


def _in_doubt(settings: Settings, request: ExecutionRequest, details: str) -> DeadLetter:
    """Decided before a database switch, no row, and the broker was not asked (or showed
    nothing within the grace): a REJECTED answer could contradict an order whose row the
    switch lost. Dead-lettered with the order magic to look for instead."""
    magic = order_magic_for(request.execution_id, settings.magic)
    log.warning(
        "approval decided before a database switch, broker not asked: dead-lettered as in"
        " doubt, never answered REJECTED (its orders would carry magic %d)",
        magic,
    )
    return DeadLetter(
        "IN_DOUBT_AFTER_DATABASE_SWITCH",
        f"{details}; decided before a database switch, whose lost commits may include its"
        f" row: look for orders with magic {magic} on the account before answering it",
    )
