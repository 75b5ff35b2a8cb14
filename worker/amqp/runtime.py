"""The RabbitMQ runtime: consume ``execution.requests``, run the handler, carry out outcomes.

Threads: one IO thread runs a pika ``IOLoop`` and owns every connection and channel; the
handler runs on a pool of ``prefetch`` worker threads; outbox reads and writes run on one
database thread. The other threads talk to the IO thread only through
``IOLoop.add_callback_threadsafe``, so slow MT5 or database calls never starve heartbeats.

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
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from schemas.request import MessageProperties
from worker.amqp.publisher import PERSISTENT, ConfirmingPublisher, PublishResult
from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    PRECONDITION_FAILED,
    REQUESTS_QUEUE,
    TopologyMismatch,
    declare,
    describe_mismatch,
)
from worker.config import Settings, mask_url
from worker.execution.outcome import (
    CONFIRMATION_SCHEMA_HEADER,
    DeadLetter,
    Delivery,
    Handler,
    Outbox,
    Outcome,
    Publish,
    Requeue,
)
from worker.observability import metrics

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ACCESS_REFUSED = 77  # wrong credentials or vhost: retrying cannot help
EXIT_TOPOLOGY_MISMATCH = 78  # an existing queue has other arguments

REJECTION_REASON_HEADER = "x-rejection-reason"
REJECTION_DETAILS_HEADER = "x-rejection-details"
MARK_BATCH_SIZE = 200
MARK_FLUSH_SECONDS = 0.2


@dataclass(frozen=True)
class RuntimeOptions:
    prefetch: int
    delivery_limit: int = 20
    drain_timeout_seconds: float = 30.0
    requeue_delay_seconds: float = 1.0
    sweep_interval_seconds: float = 10.0
    sweep_limit: int = 500
    reconnect_min_delay_seconds: float = 0.5
    reconnect_max_delay_seconds: float = 30.0
    connection_name: str = field(default_factory=lambda: f"execution-worker pid={os.getpid()}")

    @classmethod
    def from_settings(cls, settings: Settings, sessions: int) -> RuntimeOptions:
        """prefetch = the sessions of this process, unless ``PREFETCH`` overrides it."""
        return cls(
            prefetch=settings.prefetch or max(1, sessions),
            delivery_limit=settings.delivery_limit,
            drain_timeout_seconds=settings.drain_timeout_seconds,
        )


@dataclass
class RuntimeStats:
    """Counters, updated on the IO thread (read them after ``run`` returns, or for display)."""

    consumed: int = 0
    acked: int = 0
    confirmations_published: int = 0
    dead_lettered: int = 0
    requeued: int = 0
    handler_errors: int = 0
    returned: int = 0
    nacked: int = 0
    reply_returned: int = 0
    stale_results: int = 0
    outbox_republished: int = 0
    connections: int = 0


def to_message_properties(props: Any) -> MessageProperties:
    """pika ``BasicProperties`` -> the library-independent ``MessageProperties``."""
    headers = props.headers if isinstance(props.headers, dict) else {}
    return MessageProperties(
        message_id=_text(props.message_id),
        correlation_id=_text(props.correlation_id),
        reply_to=_text(props.reply_to),
        content_type=_text(props.content_type),
        content_encoding=_text(props.content_encoding),
        headers=dict(headers),
    )


def _text(value: Any) -> str | None:
    """A property as text we can store: pika gives bytes for non-UTF-8 values; NUL is out."""
    if isinstance(value, str) and "\x00" not in value:
        return value
    return None


def delivery_count_of(props: Any) -> int | None:
    """``x-delivery-count`` (quorum queues set it on redeliveries only)."""
    headers = props.headers if isinstance(props.headers, dict) else {}
    value = headers.get("x-delivery-count")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def confirmation_properties(publish: Publish) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=str(publish.execution_id),
        correlation_id=publish.correlation_id,
        headers={"schema": CONFIRMATION_SCHEMA_HEADER},
    )


def dead_letter_properties(original: Any, reason: str, details: str) -> pika.BasicProperties:
    """The original properties, persistent, with the rejection reason in headers."""
    headers = dict(original.headers) if isinstance(original.headers, dict) else {}
    headers[REJECTION_REASON_HEADER] = reason
    headers[REJECTION_DETAILS_HEADER] = details
    return pika.BasicProperties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        headers=headers,
        delivery_mode=PERSISTENT,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        expiration=None,
        message_id=original.message_id,
        timestamp=original.timestamp,
        type=original.type,
        user_id=None,  # the broker checks user_id against the publisher's login
        app_id=original.app_id,
    )


class _Threads:
    """A fixed set of daemon threads running submitted callables (never joined on exit)."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def close(self, wait_seconds: float = 0.0) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(wait_seconds)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("background job failed")


@dataclass(eq=False)
class _InFlight:
    epoch: int
    tag: int
    delivery: Delivery
    properties: Any
    routing_key: str


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
        self._url = url
        self._beat = beat
        self._handler = handler
        self._outbox = outbox
        self._options = options
        self.stats = RuntimeStats()
        self.consuming = threading.Event()  # set while a consumer is active (tests, readiness)
        self.error: str | None = None  # why run() returned non-zero (one line)

        self._ioloop: IOLoop | None = None
        self._connection: Any = None
        self._channel: Any = None
        self._publisher: ConfirmingPublisher | None = None
        self._consumer_tag: str | None = None
        self._declaring = False
        self._epoch = 0
        self._inflight: dict[int, _InFlight] = {}
        self._parked: dict[UUID, list[_InFlight]] = {}
        self._publishing: set[UUID] = set()
        self._to_mark: list[UUID] = []
        self._mark_timer: Any = None
        self._sweeping = False
        self._stop_requested = False
        self._stopping = False
        self._closing = False
        self._exit_code = EXIT_OK
        self._reconnect_delay = options.reconnect_min_delay_seconds
        self._drain_timer: Any = None
        self._loop_open = threading.Event()
        self._workers: _Threads | None = None
        self._db: _Threads | None = None

    # ----------------------------------------------------------------- public, any thread

    def run(self) -> int:
        """Block until stopped (exit 0) or a fatal broker error (77, 78)."""
        self._ioloop = IOLoop()
        self._workers = _Threads(self._options.prefetch, "handler")
        self._db = _Threads(1, "outbox")
        self._loop_open.set()
        self._ioloop.add_callback_threadsafe(self._connect)
        if self._stop_requested:
            self._ioloop.add_callback_threadsafe(self._begin_drain)
        self._ioloop.call_later(self._options.sweep_interval_seconds, self._periodic_sweep)
        self._ioloop.add_callback_threadsafe(self._heartbeat)
        try:
            self._ioloop.start()
        finally:
            self._loop_open.clear()
            self._ioloop.close()
            self._workers.close()
            # let the last mark_published batch reach the database
            self._db.close(wait_seconds=5.0)
        return self._exit_code

    def stop(self) -> None:
        """Stop consuming, finish in-flight messages within the drain timeout, then return."""
        self._stop_requested = True
        self._post(self._begin_drain)

    # ----------------------------------------------------------------- connection (IO thread)

    def _post(self, callback: Callable[[], None]) -> None:
        if self._ioloop is not None and self._loop_open.is_set():
            self._ioloop.add_callback_threadsafe(callback)

    def _heartbeat(self) -> None:
        assert self._ioloop is not None
        if self._beat is not None:
            self._beat()
        self._ioloop.call_later(1.0, self._heartbeat)

    def _connect(self) -> None:
        if self._stopping:
            self._stop_loop()
            return
        assert self._ioloop is not None
        self._epoch += 1
        params = pika.URLParameters(self._url)
        params.client_properties = {"connection_name": self._options.connection_name}
        log.info("connecting to %s", mask_url(self._url))
        self._connection = pika.SelectConnection(
            params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )

    def _on_connection_open(self, connection: Any) -> None:
        self.stats.connections += 1
        if self.stats.connections > 1:
            metrics.record_reconnect("rabbitmq")
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: Any, error: BaseException) -> None:
        self._connection = None
        if isinstance(
            error,
            pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError,
        ):
            self._fatal(EXIT_ACCESS_REFUSED, f"RabbitMQ refused access at {mask_url(self._url)}")
            return
        log.warning("cannot connect to RabbitMQ: %s", type(error).__name__)
        self._schedule_reconnect()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._lose_channel()
        self._connection = None
        if self._closing or self._stopping:
            self._stop_loop()
            return
        log.warning("RabbitMQ connection lost: %s", reason)
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._closing or self._stopping:
            self._stop_loop()
            return
        assert self._ioloop is not None
        delay = self._reconnect_delay
        self._reconnect_delay = min(delay * 2, self._options.reconnect_max_delay_seconds)
        log.info("reconnecting in %.1f s", delay)
        self._ioloop.call_later(delay, self._connect)

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        self._publisher = ConfirmingPublisher(channel, on_ready=self._declare)

    def _declare(self) -> None:
        self._declaring = True
        declare(self._channel, self._options.delivery_limit, self._on_declared)

    def _on_declared(self) -> None:
        self._declaring = False
        self._channel.basic_qos(
            prefetch_count=self._options.prefetch, callback=lambda _f: self._first_sweep()
        )

    def _first_sweep(self) -> None:
        # A restarted worker publishes what the outbox holds, then consumes.
        self._sweep(then=self._start_consuming)

    def _start_consuming(self) -> None:
        if self._channel is None or self._stopping:
            return
        self._consumer_tag = self._channel.basic_consume(
            REQUESTS_QUEUE, self._on_message, callback=lambda _f: self._on_consuming()
        )

    def _on_consuming(self) -> None:
        self._reconnect_delay = self._options.reconnect_min_delay_seconds
        self.consuming.set()
        log.info("consuming %s (prefetch %d)", REQUESTS_QUEUE, self._options.prefetch)

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        declaring = self._declaring
        self._lose_channel()
        if (
            declaring
            and isinstance(reason, pika.exceptions.ChannelClosedByBroker)
            and reason.reply_code == PRECONDITION_FAILED
        ):
            message = describe_mismatch(reason.reply_text)
            self._fatal(EXIT_TOPOLOGY_MISMATCH, str(TopologyMismatch(message)))
            return
        connection = self._connection
        if connection is not None and connection.is_open:
            if not (self._closing or self._stopping):
                log.warning("channel closed: %s", reason)
            connection.close()

    def _lose_channel(self) -> None:
        """The channel is gone: its deliveries will be redelivered, its confirms never come."""
        self.consuming.clear()
        self._channel = None
        self._consumer_tag = None
        self._declaring = False
        self._epoch += 1  # results of the old channel's deliveries are now stale
        metrics.in_flight(-len(self._inflight))
        self._inflight.clear()
        self._parked.clear()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.fail_all()

    def _fatal(self, code: int, message: str) -> None:
        self.error = message
        self._exit_code = code
        log.error("%s", message)
        self._closing = True
        self._close_or_stop()

    def _stop_loop(self) -> None:
        assert self._ioloop is not None
        self._flush_marks()
        self._ioloop.stop()

    # ----------------------------------------------------------------- deliveries (IO thread)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.stats.consumed += 1
        if self._stopping:
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        delivery = Delivery(
            body=body,
            properties=to_message_properties(properties),
            redelivered=bool(method.redelivered),
            delivery_count=delivery_count_of(properties),
            received_at=datetime.now(UTC),
        )
        item = _InFlight(self._epoch, method.delivery_tag, delivery, properties, method.routing_key)
        self._inflight[item.tag] = item
        metrics.in_flight(1)
        assert self._workers is not None
        self._workers.submit(lambda: self._work(item))

    def _work(self, item: _InFlight) -> None:
        """Worker thread: run the handler, hand the outcome to the IO thread."""
        outcome: Outcome
        try:
            outcome = self._handler(item.delivery)
        except Exception as exc:
            log.exception("handler raised; requeueing the delivery")
            outcome = Requeue(f"handler raised {type(exc).__name__}")
            self._post(self._count_handler_error)
        self._post(lambda: self._on_outcome(item, outcome))

    def _count_handler_error(self) -> None:
        self.stats.handler_errors += 1

    def _current(self, item: _InFlight) -> bool:
        return item.epoch == self._epoch and self._inflight.get(item.tag) is item

    def _on_outcome(self, item: _InFlight, outcome: Outcome) -> None:
        if not self._current(item) or self._publisher is None:
            # its channel died: the broker redelivers it; never ack on another channel
            self.stats.stale_results += 1
            self._check_drained()
            return
        if isinstance(outcome, Publish):
            self._publish_confirmation(
                outcome, on_confirmed=lambda: self._settle(item, ack=True), on_failed=item
            )
        elif isinstance(outcome, DeadLetter):
            self._dead_letter(item, outcome)
        else:
            self._requeue(item, outcome.reason)

    def _publish_confirmation(
        self,
        publish: Publish,
        on_confirmed: Callable[[], None] | None,
        on_failed: _InFlight | None,
    ) -> None:
        """Publish to ``execution.confirmations`` (and reply_to); park ``on_failed`` if refused."""
        assert self._publisher is not None
        execution_id = publish.execution_id
        epoch = self._epoch
        properties = confirmation_properties(publish)
        self._publishing.add(execution_id)
        started = time.perf_counter()

        def done(result: PublishResult) -> None:
            self._publishing.discard(execution_id)
            if epoch != self._epoch:
                return
            if result is PublishResult.CONFIRMED:
                metrics.observe_stage("publish", time.perf_counter() - started)
                self.stats.confirmations_published += 1
                self._mark(execution_id)
                for parked in self._parked.pop(execution_id, []):
                    self._settle(parked, ack=True)
                if on_confirmed is not None:
                    on_confirmed()
            elif result is not PublishResult.LOST:
                if result is PublishResult.RETURNED:
                    self.stats.returned += 1
                else:
                    self.stats.nacked += 1
                # the sweep retries every interval: warn once, on the live path
                log.log(
                    logging.WARNING if on_failed is not None else logging.DEBUG,
                    "confirmation %s %s by the broker (routing key %s); the outbox retries it",
                    execution_id,
                    result.value,
                    publish.routing_key,
                )
                if on_failed is not None and self._current(on_failed):
                    if self._stopping:
                        self._settle(on_failed, ack=False)
                    else:
                        self._parked.setdefault(execution_id, []).append(on_failed)
            self._check_drained()

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

    def _on_reply_result(self, publish: Publish, result: PublishResult) -> None:
        if result in (PublishResult.RETURNED, PublishResult.NACKED):
            self.stats.reply_returned += 1
            log.info(
                "reply_to %r did not take confirmation %s (%s); it is on %s",
                publish.reply_to,
                publish.execution_id,
                result.value,
                CONFIRMATIONS_EXCHANGE,
            )
        self._check_drained()

    def _dead_letter(self, item: _InFlight, outcome: DeadLetter) -> None:
        assert self._publisher is not None
        properties = dead_letter_properties(item.properties, outcome.reason, outcome.details)

        def done(result: PublishResult) -> None:
            if result is PublishResult.CONFIRMED:
                self.stats.dead_lettered += 1
                metrics.record_dead_letter(outcome.reason.upper())
                self._settle(item, ack=True)
            elif result is PublishResult.LOST:
                self._check_drained()
            else:
                log.warning("dead letter %s by the broker; requeueing", result.value)
                self._requeue(item, f"dead letter {result.value}")

        log.info("dead-lettering a delivery: %s", outcome.reason)
        self._publisher.publish(
            DEAD_LETTER_EXCHANGE,
            item.routing_key,
            item.delivery.body,
            properties,
            mandatory=True,
            on_result=done,
        )

    def _requeue(self, item: _InFlight, reason: str) -> None:
        log.info("requeueing a delivery: %s", reason)
        if self._stopping or self._options.requeue_delay_seconds <= 0:
            self._settle(item, ack=False)
            return
        assert self._ioloop is not None
        # a short pause so that a claim timeout does not spin through the delivery limit
        self._ioloop.call_later(
            self._options.requeue_delay_seconds, lambda: self._settle(item, ack=False)
        )

    def _settle(self, item: _InFlight, *, ack: bool) -> None:
        """Ack or nack-with-requeue, on the delivery's own channel only."""
        if not self._current(item) or self._channel is None:
            self._check_drained()
            return
        del self._inflight[item.tag]
        metrics.in_flight(-1)
        if ack:
            self._channel.basic_ack(item.tag)
            self.stats.acked += 1
            elapsed = datetime.now(UTC) - item.delivery.received_at
            metrics.observe_end_to_end(elapsed.total_seconds())
        else:
            self._channel.basic_nack(item.tag, requeue=True)
            self.stats.requeued += 1
        self._check_drained()

    # ----------------------------------------------------------------- outbox (IO thread)

    def _periodic_sweep(self) -> None:
        assert self._ioloop is not None
        if self._closing:
            return
        if self.consuming.is_set():
            self._sweep(then=None)
        self._ioloop.call_later(self._options.sweep_interval_seconds, self._periodic_sweep)

    def _sweep(self, then: Callable[[], None] | None) -> None:
        if self._sweeping or self._db is None:
            if then is not None:
                then()
            return
        self._sweeping = True
        epoch = self._epoch
        limit = self._options.sweep_limit

        def fetch() -> None:
            try:
                items = self._outbox.unpublished(limit)
            except Exception as exc:
                log.warning("outbox sweep failed: %s", type(exc).__name__)
                items = []
            self._post(lambda: self._on_swept(epoch, items, then))

        self._db.submit(fetch)

    def _on_swept(
        self, epoch: int, items: Sequence[Publish], then: Callable[[], None] | None
    ) -> None:
        self._sweeping = False
        if epoch != self._epoch:
            return  # swept for a channel that is gone; the new one sweeps for itself
        if self._publisher is not None:
            for publish in items:
                if publish.execution_id in self._publishing:
                    continue  # the live path is publishing it right now
                self.stats.outbox_republished += 1
                self._publish_confirmation(publish, on_confirmed=None, on_failed=None)
            if items:
                log.info("outbox: republished %d confirmation(s)", len(items))
        if then is not None:
            then()

    def _mark(self, execution_id: UUID) -> None:
        self._to_mark.append(execution_id)
        if len(self._to_mark) >= MARK_BATCH_SIZE:
            self._flush_marks()
        elif self._mark_timer is None and self._ioloop is not None:
            self._mark_timer = self._ioloop.call_later(MARK_FLUSH_SECONDS, self._flush_marks)

    def _flush_marks(self) -> None:
        if self._mark_timer is not None and self._ioloop is not None:
            self._ioloop.remove_timeout(self._mark_timer)
        self._mark_timer = None
        batch, self._to_mark = self._to_mark, []
        if not batch or self._db is None:
            return

        def write() -> None:
            try:
                self._outbox.mark_published(batch)
            except Exception as exc:
                # harmless: the sweep publishes these again (same message_id)
                log.warning("outbox mark_published failed: %s", type(exc).__name__)

        self._db.submit(write)

    # ----------------------------------------------------------------- drain (IO thread)

    def _begin_drain(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        assert self._ioloop is not None
        log.info("draining: %d delivery(ies) in flight", len(self._inflight))
        if self._channel is None:
            self._shutdown()
            return
        self.consuming.clear()
        if self._consumer_tag is not None:
            self._channel.basic_cancel(self._consumer_tag)
        # parked requests wait for a route that may never come: hand them back now
        for parked in [p for items in self._parked.values() for p in items]:
            self._settle(parked, ack=False)
        self._parked.clear()
        self._drain_timer = self._ioloop.call_later(
            self._options.drain_timeout_seconds, self._on_drain_timeout
        )
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._stopping or self._closing:
            return
        publishing = self._publisher.in_flight if self._publisher is not None else 0
        if not self._inflight and publishing == 0:
            self._shutdown()

    def _on_drain_timeout(self) -> None:
        self._drain_timer = None
        if self._inflight:
            log.warning("drain timeout: requeueing %d delivery(ies)", len(self._inflight))
        for item in list(self._inflight.values()):
            self._settle(item, ack=False)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        assert self._ioloop is not None
        if self._drain_timer is not None:
            self._ioloop.remove_timeout(self._drain_timer)
            self._drain_timer = None
        self._flush_marks()
        self.consuming.clear()
        self._close_or_stop()

    def _close_or_stop(self) -> None:
        """Close the connection (its close callback stops the loop), or stop the loop now."""
        connection = self._connection
        if connection is None or connection.is_closed:
            self._stop_loop()
        elif not connection.is_closing:
            connection.close()


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
