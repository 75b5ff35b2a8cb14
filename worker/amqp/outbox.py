"""Confirmations out: publish with confirms, sweep the outbox, mark what the broker took.

Every confirmation goes to ``execution.confirmations`` with publisher confirms,
``mandatory`` and persistent delivery; a copy goes to ``reply_to`` (best effort: a vanished
reply queue is logged, it never blocks the ack, the topic exchange holds the real record).
A confirmation that no binding of ``execution.confirmations`` wants goes to the queue
``execution.confirmations.unrouted``: through the exchange's alternate exchange (a policy,
:mod:`worker.amqp.topology`), or, when the broker returns it (no policy), republished there
by the worker (same body and properties, the routing key in a header), counted in
``execution_worker_confirmations_unrouted_total``. So a confirmation nobody is bound for
never stalls the worker. A confirmation the broker nacked (or that even the unrouted queue
refused) stays in the outbox; the periodic sweep publishes it again and acks the requests
parked on it once it is confirmed. Published marks are written in batches on the outbox's
own database thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

import pika

from schemas.confirmation import message_id_for
from worker.amqp.deliveries import Deliveries, InFlight
from worker.amqp.loop import IoLoop, Threads
from worker.amqp.options import RuntimeOptions, RuntimeStats
from worker.amqp.publisher import PERSISTENT, ConfirmingPublisher, PublishResult
from worker.amqp.topology import CONFIRMATIONS_EXCHANGE, UNROUTED_QUEUE
from worker.execution.outcome import CONFIRMATION_SCHEMA_HEADER, Outbox, Publish
from worker.observability import metrics

log = logging.getLogger(__name__)

MARK_BATCH_SIZE = 200
MARK_FLUSH_SECONDS = 0.2
ORIGINAL_ROUTING_KEY_HEADER = "x-original-routing-key"


@runtime_checkable
class BackoffOutbox(Protocol):
    """An outbox that backs off the confirmations the broker refused (``Store``)."""

    def mark_failed(
        self,
        execution_ids: Sequence[UUID | tuple[UUID, int]],
        *,
        backoff_seconds: float,
        max_backoff_seconds: float,
    ) -> None: ...


@runtime_checkable
class AnnouncingOutbox(Protocol):
    """An outbox that tells of confirmations committed off the handler path (``Store``)."""

    def watch(self, watcher: Callable[[Publish], None]) -> Callable[[], None]: ...


def confirmation_properties(publish: Publish) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=message_id_for(publish.execution_id, publish.version),
        correlation_id=publish.correlation_id,
        headers={"schema": CONFIRMATION_SCHEMA_HEADER},
    )


class Confirmations:
    """Publishes confirmations on the current channel and keeps the outbox in step (IO thread)."""

    def __init__(
        self,
        outbox: Outbox,
        deliveries: Deliveries,
        loop: IoLoop,
        options: RuntimeOptions,
        stats: RuntimeStats,
        *,
        on_result: Callable[[], None],
    ) -> None:
        """``on_result`` runs after every publish outcome (the runtime checks its drain)."""
        self._outbox = outbox
        self._deliveries = deliveries
        self._loop = loop
        self._options = options
        self._stats = stats
        self._on_result = on_result
        self._publisher: ConfirmingPublisher | None = None
        self._publishing: set[UUID] = set()
        self._to_mark: list[tuple[UUID, int]] = []
        self._to_fail: list[tuple[UUID, int]] = []
        # an outbox that records refused publishes backs them off (the store does)
        self._backoff = outbox if isinstance(outbox, BackoffOutbox) else None
        self._mark_timer: Any = None
        self._sweeping = False
        self._sweep_refused: dict[str, int] = {}  # this sweep's publishes the broker refused
        self._db: Threads | None = None

    def start(self) -> None:
        """Start the outbox's database thread."""
        self._db = Threads(1, "outbox")

    def close(self) -> None:
        """Let the last batch of marks reach the database (bounded wait)."""
        if self._db is not None:
            self._db.close(wait_seconds=5.0)

    def attach(self, publisher: ConfirmingPublisher) -> None:
        self._publisher = publisher

    def detach(self) -> None:
        self._publisher = None

    @property
    def attached(self) -> bool:
        return self._publisher is not None

    @property
    def in_flight(self) -> int:
        """Publishes (confirmations, reply copies, dead letters) waiting for their confirm."""
        return self._publisher.in_flight if self._publisher is not None else 0

    def publish(
        self,
        publish: Publish,
        on_confirmed: Callable[[], None] | None,
        on_failed: InFlight | None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Publish to ``execution.confirmations`` (and reply_to); park ``on_failed`` if refused.

        ``on_done`` runs once the outcome is known, whatever it is (after the rest)."""
        assert self._publisher is not None
        execution_id = publish.execution_id
        epoch = self._deliveries.epoch
        properties = confirmation_properties(publish)
        self._publishing.add(execution_id)
        started = time.perf_counter()

        def done(result: PublishResult) -> None:
            if (
                result is PublishResult.RETURNED
                and epoch == self._deliveries.epoch
                and self._publisher is not None
            ):
                self._stats.returned += 1
                self._publish_unrouted(publish, done_unrouted)
                return
            finish(result)

        def done_unrouted(result: PublishResult) -> None:
            if result is PublishResult.CONFIRMED:
                metrics.record_unrouted_confirmation()
                self._stats.unrouted += 1
            finish(result)

        def finish(result: PublishResult) -> None:
            self._publishing.discard(execution_id)
            if epoch == self._deliveries.epoch:
                self._on_publish_result(publish, result, started, on_confirmed, on_failed)
            if on_done is not None:
                on_done()

        self._publisher.publish(
            CONFIRMATIONS_EXCHANGE,
            publish.routing_key,
            publish.payload,
            properties,
            mandatory=True,
            on_result=done,
        )
        if publish.reply_to:
            self._publisher.publish(
                "",
                publish.reply_to,
                publish.payload,
                properties,
                mandatory=True,
                on_result=lambda result: self._on_reply_result(publish, result),
            )

    def _publish_unrouted(
        self, publish: Publish, on_result: Callable[[PublishResult], None]
    ) -> None:
        """The broker returned the confirmation (nothing bound, no alternate exchange on
        ``execution.confirmations``): park it in the unrouted queue, durable and confirmed."""
        assert self._publisher is not None
        log.info(
            "confirmation %s matched no binding (routing key %s): moved to %s",
            publish.execution_id,
            publish.routing_key,
            UNROUTED_QUEUE,
        )
        properties = confirmation_properties(publish)
        properties.headers = {
            **(properties.headers or {}),
            ORIGINAL_ROUTING_KEY_HEADER: publish.routing_key,
        }
        self._publisher.publish(
            "", UNROUTED_QUEUE, publish.payload, properties, mandatory=True, on_result=on_result
        )

    def _on_publish_result(
        self,
        publish: Publish,
        result: PublishResult,
        started: float,
        on_confirmed: Callable[[], None] | None,
        on_failed: InFlight | None,
    ) -> None:
        execution_id = publish.execution_id
        if result is PublishResult.CONFIRMED:
            metrics.observe_stage("publish", time.perf_counter() - started)
            self._stats.confirmations_published += 1
            self._mark((execution_id, publish.version))
            self._deliveries.confirmed(execution_id)
            if on_confirmed is not None:
                on_confirmed()
        elif result is not PublishResult.LOST:
            if result is PublishResult.RETURNED:
                self._stats.returned += 1  # even the unrouted queue did not take it
            else:
                self._stats.nacked += 1
            self._fail((execution_id, publish.version))
            # the sweep retries it (with backoff): warn once, on the live path; a return here
            # means even the unrouted queue did not take it (deleted since the declare)
            log.log(
                logging.WARNING if on_failed is not None else logging.DEBUG,
                "confirmation %s %s by the broker (routing key %s); the outbox retries it",
                execution_id,
                result.value,
                publish.routing_key,
            )
            if on_failed is not None:
                self._deliveries.park(execution_id, on_failed)
            else:
                self._sweep_refused[result.value] = self._sweep_refused.get(result.value, 0) + 1
        self._on_result()

    def _on_reply_result(self, publish: Publish, result: PublishResult) -> None:
        if result in (PublishResult.RETURNED, PublishResult.NACKED):
            self._stats.reply_returned += 1
            log.info(
                "reply_to %r did not take confirmation %s (%s); it is on %s",
                publish.reply_to,
                publish.execution_id,
                result.value,
                CONFIRMATIONS_EXCHANGE,
            )
        self._on_result()

    # ----------------------------------------------------------------- sweep

    def sweep(self, then: Callable[[], None] | None) -> None:
        """Publish what the outbox holds unpublished, then call ``then``."""
        if self._sweeping or self._db is None:
            if then is not None:
                then()
            return
        self._sweeping = True
        epoch = self._deliveries.epoch
        limit = self._options.sweep_limit

        def fetch() -> None:
            try:
                items = self._outbox.unpublished(limit)
            except Exception as exc:
                log.warning("outbox sweep failed: %s", type(exc).__name__)
                items = []
            self._loop.post(lambda: self._on_swept(epoch, items, then))

        self._db.submit(fetch)

    def _on_swept(
        self, epoch: int, items: Sequence[Publish], then: Callable[[], None] | None
    ) -> None:
        if epoch != self._deliveries.epoch:
            self._sweeping = False
            return  # swept for a channel that is gone; the new one sweeps for itself
        due = [p for p in items if p.execution_id not in self._publishing]  # else live path has it
        if self._publisher is None or not due:
            self._end_sweep()
        else:
            left = [len(due)]

            def one_done() -> None:
                left[0] -= 1
                if left[0] == 0:
                    self._end_sweep()

            for publish in due:
                self._stats.outbox_republished += 1
                self.publish(publish, on_confirmed=None, on_failed=None, on_done=one_done)
            log.info("outbox: republished %d confirmation(s)", len(due))
        if then is not None:
            then()

    def _end_sweep(self) -> None:
        """Every publish of the sweep has its outcome. Its marks are written before the next
        sweep reads (one database thread, in order), so that sweep sees the backoff of every
        row this one retried in vain and takes the rows due after them."""
        self._sweeping = False
        self._stats.sweeps += 1
        if self._sweep_refused:
            refused, self._sweep_refused = self._sweep_refused, {}
            log.warning(
                "outbox sweep: the broker refused %s; retried with backoff",
                ", ".join(f"{count} ({how})" for how, count in sorted(refused.items())),
            )
        self.flush_marks()

    # ----------------------------------------------------------------- published marks

    def _mark(self, key: tuple[UUID, int]) -> None:
        self._to_mark.append(key)
        self._flush_soon(len(self._to_mark))

    def _fail(self, key: tuple[UUID, int]) -> None:
        if self._backoff is not None:
            self._to_fail.append(key)
            self._flush_soon(len(self._to_fail))

    def _flush_soon(self, batch: int) -> None:
        if batch >= MARK_BATCH_SIZE:
            self.flush_marks()
        elif self._mark_timer is None:
            self._mark_timer = self._loop.call_later(MARK_FLUSH_SECONDS, self.flush_marks)

    def flush_marks(self) -> None:
        """Write the published and failed marks gathered so far (database thread)."""
        if self._mark_timer is not None:
            self._loop.remove_timeout(self._mark_timer)
        self._mark_timer = None
        published, self._to_mark = self._to_mark, []
        failed, self._to_fail = self._to_fail, []
        if self._db is None:
            return
        if published:

            def write() -> None:
                try:
                    self._outbox.mark_published(published)
                except Exception as exc:
                    # harmless: the sweep publishes these again (same message_id)
                    log.warning("outbox mark_published failed: %s", type(exc).__name__)

            self._db.submit(write)
        if failed and self._backoff is not None:
            backoff = self._backoff
            options = self._options

            def write_failed() -> None:
                try:
                    backoff.mark_failed(
                        failed,
                        backoff_seconds=options.outbox_backoff_seconds,
                        max_backoff_seconds=options.outbox_backoff_max_seconds,
                    )
                except Exception as exc:
                    # harmless: these rows are retried without waiting
                    log.warning("outbox mark_failed failed: %s", type(exc).__name__)

            self._db.submit(write_failed)
