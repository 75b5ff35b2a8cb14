"""The RabbitMQ runtime: consume ``execution.requests``, run the handler, carry out outcomes.

Threads: one IO thread runs a pika ``IOLoop`` (:mod:`worker.amqp.loop`) and owns every
connection and channel; the handler runs on a pool of ``prefetch`` worker threads; outbox
reads and writes run on one database thread. The other threads talk to the IO thread only
through ``IOLoop.add_callback_threadsafe``, so slow MT5 or database calls never starve
heartbeats.

The parts, one concern each (in the spirit of pika's asynchronous consumer example and
Celery's consumer steps): :mod:`~worker.amqp.connection` (connect, reconnect, channel,
consumer, fatal exits), :mod:`~worker.amqp.deliveries` (in flight, epochs, ack / requeue /
dead letter), :mod:`~worker.amqp.outbox` (confirmation publishing, sweep, marks). This
module wires them, hands deliveries to the handler threads and their outcomes back, and
drains on :meth:`AmqpRuntime.stop`.

Guarantees (DOMAIN.md 3, worker/execution/outcome.py):

- A request is acked only after the broker confirmed its confirmation (publisher confirms,
  ``mandatory``, persistent), and only on the channel it arrived on. A result that comes
  back after its channel died is dropped: the broker redelivers the request and the
  pipeline answers it from its store without a second order.
- A confirmation the broker returned (no queue bound for its routing key) or nacked keeps
  its request unacked ("parked"); the periodic outbox sweep publishes it again and acks
  the parked request once it is confirmed. Requeueing instead would burn the quorum
  queue's delivery limit and dead-letter a trade that was executed.
- Copies to ``reply_to`` are best effort: published with ``mandatory`` so a vanished reply
  queue is logged, but never block the ack (the topic exchange holds the real record).
- The handler never raises by contract; if it does, the request is requeued (after a short
  delay) and the delivery limit eventually dead-letters a poison message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.amqp.connection import (
    Connection,
)
from worker.amqp.deliveries import (
    REJECTION_DETAILS_HEADER,
    REJECTION_REASON_HEADER,
    Deliveries,
    InFlight,
    dead_letter_properties,
    delivery_count_of,
    to_message_properties,
)
from worker.amqp.finished import log_finished
from worker.amqp.loop import IoLoop, Mailbox, Threads
from worker.amqp.options import RuntimeOptions, RuntimeStats
from worker.amqp.outbox import AnnouncingOutbox, Confirmations, confirmation_properties
from worker.amqp.publisher import ConfirmingPublisher
from worker.config import Settings
from worker.execution.outcome import (
    DeadLetter,
    Handler,
    Outbox,
    Outcome,
    Publish,
    Requeue,
    Settling,
)
from worker.observability import metrics

__all__ = [
    "REJECTION_DETAILS_HEADER",
    "REJECTION_REASON_HEADER",
    "AmqpRuntime",
    "RuntimeOptions",
    "RuntimeStats",
    "confirmation_properties",
    "dead_letter_properties",
    "delivery_count_of",
    "runtime_from_settings",
    "to_message_properties",
]

log = logging.getLogger(__name__)

# a handler outcome or settler confirmation waits one loop turn; this long means none is run
MAILBOX_STUCK_SECONDS = 5.0


class AmqpRuntime:
    """Consume, hand to the handler, publish, ack; reconnect; drain on :meth:`stop`."""

    def __init__(
        self,
        url: str,
        handler: Handler,
        outbox: Outbox,
        options: RuntimeOptions,
        *,
        beat: Callable[[], None] | None = None,
    ) -> None:
        """``beat`` is called on the IO thread every second: a liveness signal (healthz)."""
        self._beat = beat
        self._handler = handler
        self._options = options
        self.stats = RuntimeStats()
        self.consuming = threading.Event()  # set while a consumer is active (tests, readiness)

        self._loop = IoLoop()
        self._outcomes = Mailbox(self._loop)  # handler threads -> IO thread
        self._mailbox_stuck = False
        self._stop_requested = False
        self._stopping = False
        self._drain_timer: Any = None
        self._workers: Threads | None = None
        self._metrics: Threads | None = None
        self._refreshing = False
        self._next_refresh = 0.0
        self._deliveries = Deliveries(
            self._loop,
            options,
            self.stats,
            stopping=lambda: self._stopping,
            on_settled=self._check_drained,
        )
        self._confirmations = Confirmations(
            outbox,
            self._deliveries,
            self._loop,
            options,
            self.stats,
            on_result=self._check_drained,
        )
        # the settler's confirmations: published at once, they ack the deliveries parked on them
        self._unwatch = (
            outbox.watch(self.publish_settled) if isinstance(outbox, AnnouncingOutbox) else None
        )
        self._connection = Connection(
            url,
            self._loop,
            options,
            self.stats,
            self.consuming,
            stopping=lambda: self._stopping,
            on_message=self._on_message,
            on_ready=self._on_channel_ready,
            on_lost=self._on_channel_lost,
            on_closed=self._stop_loop,
        )

    @property
    def node(self) -> str | None:
        """host:port of the RabbitMQ node connected to (None while reconnecting)."""
        return self._connection.node

    @property
    def error(self) -> str | None:
        """Why run() returned non-zero (one line)."""
        return self._connection.error

    # ----------------------------------------------------------------- public, any thread

    def run(self) -> int:
        """Block until stopped (exit 0) or a fatal broker error (77, 78)."""
        self._loop.open()
        self._workers = Threads(self._options.prefetch, "handler")
        self._metrics = Threads(1, "metrics")
        self._confirmations.start()
        self._loop.post(self._connection.connect)
        if self._stop_requested:
            self._loop.post(self._begin_drain)
        self._loop.call_later(self._options.sweep_interval_seconds, self._periodic_sweep)
        self._loop.post(self._heartbeat)
        try:
            self._loop.start()
        finally:
            if self._unwatch is not None:
                self._unwatch()
            self._loop.close()
            self._workers.close()
            self._metrics.close()
            self._confirmations.close()
        return self._connection.exit_code

    def publish_settled(self, publish: Publish) -> None:
        """Any thread: a confirmation committed off the handler path (the settler). It is
        published now, and acks the delivery parked on its execution once confirmed; with
        no channel, the outbox sweep publishes it later."""
        self._outcomes.put(lambda: self._publish_settled(publish))

    def _publish_settled(self, publish: Publish) -> None:
        if not self._confirmations.attached:
            return  # the outbox sweep publishes it on the next channel
        waiting = self._deliveries.answer(publish)
        if not waiting:
            self._confirmations.publish(publish, on_confirmed=None, on_failed=None)
        for item in waiting:  # each delivery gets its confirmation, as a handler's would
            self._answer(publish, item)

    def _answer(self, publish: Publish, item: InFlight) -> None:
        """Publish the confirmation for this delivery; ack it once the broker confirms."""

        def confirmed() -> None:
            self._deliveries.settle(item, ack=True)
            log_finished(publish, item.delivery.received_at, redelivered=item.delivery.redelivered)

        self._confirmations.publish(publish, on_confirmed=confirmed, on_failed=item)

    def stop(self) -> None:
        """Stop consuming, finish in-flight messages within the drain timeout, then return."""
        self._stop_requested = True
        self._loop.post(self._begin_drain)

    # ----------------------------------------------------------------- wiring (IO thread)

    def _heartbeat(self) -> None:
        stuck = self._outcomes.waiting_seconds() > MAILBOX_STUCK_SECONDS
        if stuck and not self._mailbox_stuck:
            # the loop turns but the handlers' outcomes do not reach it: no beat, so that
            # /healthz says stalled and the orchestrator restarts the worker
            log.error("handler outcomes wait unread by the IO loop: no heartbeat until they move")
        self._mailbox_stuck = stuck
        if not stuck and self._beat is not None:
            self._beat()
        self._refresh_metrics()
        self._loop.call_later(1.0, self._heartbeat)

    def _refresh_metrics(self) -> None:
        """Set the callback gauges (sessions, outbox backlog) from this process.

        A ``run --processes N`` child serves no ``/metrics`` of its own, so no scrape ever
        refreshes them there. The readers query the pool and the database: they run on
        their own thread, one refresh at a time, never on the IO thread."""
        now = time.monotonic()
        if self._refreshing or now < self._next_refresh or self._metrics is None:
            return
        self._refreshing = True
        self._next_refresh = now + self._options.metrics_refresh_seconds

        def refresh() -> None:
            try:
                metrics.refresh()
            finally:
                self._loop.post(self._on_metrics_refreshed)

        self._metrics.submit(refresh)

    def _on_metrics_refreshed(self) -> None:
        self._refreshing = False

    def _on_channel_ready(self, channel: Any, publisher: ConfirmingPublisher) -> None:
        self._deliveries.attach(channel, publisher)
        self._confirmations.attach(publisher)
        # A restarted worker publishes what the outbox holds, then consumes.
        self._confirmations.sweep(then=self._connection.start_consuming)

    def _on_channel_lost(self) -> None:
        self._deliveries.lose_channel()
        self._confirmations.detach()

    def _periodic_sweep(self) -> None:
        if self._connection.closing:
            return
        if self.consuming.is_set():
            self._confirmations.sweep(then=None)
        self._loop.call_later(self._options.sweep_interval_seconds, self._periodic_sweep)

    def _stop_loop(self) -> None:
        self._confirmations.flush_marks()
        self._loop.stop()

    # ----------------------------------------------------------------- hand-off

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        item = self._deliveries.receive(channel, method, properties, body)
        if item is not None:
            assert self._workers is not None
            self._workers.submit(lambda: self._work(item))

    def _work(self, item: InFlight) -> None:
        """Worker thread: run the handler, hand the outcome to the IO thread."""
        outcome: Outcome
        if self._stopping:
            # received but not begun when the drain started (the channel's prefetch holds
            # more than the handlers): handed back untouched, for another worker
            self._outcomes.put(lambda: self._on_outcome(item, Requeue("draining")))
            return
        try:
            outcome = self._handler(item.delivery)
        except Exception as exc:
            log.exception("handler raised; requeueing the delivery")
            outcome = Requeue(f"handler raised {type(exc).__name__}")
            self._outcomes.put(self._count_handler_error)
        self._outcomes.put(lambda: self._on_outcome(item, outcome))

    def _count_handler_error(self) -> None:
        self.stats.handler_errors += 1

    def _on_outcome(self, item: InFlight, outcome: Outcome) -> None:
        if not self._deliveries.current(item):
            # its channel died: the broker redelivers it; never ack on another channel
            self.stats.stale_results += 1
            self._check_drained()
            return
        if isinstance(outcome, Publish):
            self._answer(outcome, item)
        elif isinstance(outcome, DeadLetter):
            self._deliveries.dead_letter(item, outcome)
        elif isinstance(outcome, Settling):
            # unacked until the settler's confirmation comes (publish_settled)
            answered = self._deliveries.wait_on(outcome.execution_id, item)
            if answered is not None:
                self._answer(answered, item)
        else:
            self._deliveries.requeue(item, outcome.reason, to_back=outcome.to_back)

    # ----------------------------------------------------------------- drain (IO thread)

    def _begin_drain(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("draining: %d delivery(ies) in flight", len(self._deliveries))
        if not self._connection.has_channel:
            self._shutdown()
            return
        self._connection.cancel_consumer()
        self._deliveries.requeue_parked()
        self._drain_timer = self._loop.call_later(
            self._options.drain_timeout_seconds, self._on_drain_timeout
        )
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._stopping or self._connection.closing:
            return
        if not len(self._deliveries) and self._confirmations.in_flight == 0:
            self._shutdown()

    def _on_drain_timeout(self) -> None:
        self._drain_timer = None
        self._deliveries.requeue_all()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._connection.closing:
            return
        if self._drain_timer is not None:
            self._loop.remove_timeout(self._drain_timer)
            self._drain_timer = None
        self._deliveries.flush_acks()  # before the close: they are settled, the broker must know
        self._confirmations.flush_marks()
        self._connection.close()


def runtime_from_settings(
    settings: Settings,
    handler: Handler,
    outbox: Outbox,
    sessions: int,
    *,
    beat: Callable[[], None] | None = None,
) -> AmqpRuntime:
    """An :class:`AmqpRuntime` configured from settings (call ``run()`` on it)."""
    return AmqpRuntime(
        settings.rabbitmq_url.get_secret_value(),
        handler,
        outbox,
        RuntimeOptions.from_settings(settings, sessions),
        beat=beat,
    )
