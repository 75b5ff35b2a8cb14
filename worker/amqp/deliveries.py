"""Deliveries in flight on the current channel, and how each one ends: ack, requeue, dead letter.

A delivery can only be settled on the channel it arrived on. Every lost channel starts a new
*epoch*: results for deliveries of an older epoch are stale and dropped (the broker
redelivers those requests, and the pipeline answers them from its store without a second
order). A request whose confirmation the broker returned or nacked is *parked* (kept
unacked) until the outbox sweep gets the confirmation confirmed.

Acks settled in one IO-loop turn (one ``Basic.Ack`` from the broker often confirms several
confirmations) go out together at the end of the turn: the tags below every delivery
still unsettled on the channel as one ``basic_ack(multiple=True)``, the others one by one.
A multiple ack covers every unsettled tag up to its own, so it never reaches past a
delivery still in flight, parked, being dead-lettered or waiting for its requeue; nacks
are sent at once, before any later multiple ack.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pika

from schemas.request import MessageProperties
from worker.amqp.loop import IoLoop
from worker.amqp.options import RuntimeOptions, RuntimeStats
from worker.amqp.publisher import PERSISTENT, ConfirmingPublisher, PublishResult
from worker.amqp.topology import DEAD_LETTER_EXCHANGE, REQUESTS_QUEUE
from worker.execution.outcome import DeadLetter, Delivery, Publish
from worker.observability import metrics

log = logging.getLogger(__name__)

REJECTION_REASON_HEADER = "x-rejection-reason"
REJECTION_DETAILS_HEADER = "x-rejection-details"
# when the worker dead-lettered it (ISO 8601, UTC, ms): the broker's x-death has no entry
# for a message the worker publishes to the DLX itself
DEAD_LETTERED_AT_HEADER = "x-dead-lettered-at"
# how many times a request went to the back of the queue waiting for its account
ACCOUNT_WAITS_HEADER = "x-account-waits"
# set by the broker on redeliveries; a copy published again starts as a new message
_BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-queue", "x-first-death-reason")


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


def dead_letter_properties(original: Any, reason: str, details: str) -> pika.BasicProperties:
    """The original properties, persistent, with the rejection reason in headers."""
    headers = dict(original.headers) if isinstance(original.headers, dict) else {}
    headers[REJECTION_REASON_HEADER] = reason
    headers[REJECTION_DETAILS_HEADER] = details
    headers[DEAD_LETTERED_AT_HEADER] = datetime.now(UTC).isoformat(timespec="milliseconds")
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


def back_of_queue_properties(original: Any) -> pika.BasicProperties:
    """The original properties, persistent, for a copy published again at the back of
    ``execution.requests``; the broker's own headers dropped, the waits counted."""
    properties = dead_letter_properties(original, "", "")
    headers = dict(properties.headers or {})
    for name in (
        REJECTION_REASON_HEADER,
        REJECTION_DETAILS_HEADER,
        DEAD_LETTERED_AT_HEADER,
        *_BROKER_HEADERS,
    ):
        headers.pop(name, None)
    waits = headers.get(ACCOUNT_WAITS_HEADER)
    count = waits if isinstance(waits, int) and not isinstance(waits, bool) else 0
    headers[ACCOUNT_WAITS_HEADER] = count + 1
    properties.headers = headers
    return properties


ANSWERED_REMEMBERED = 4096


@dataclass(eq=False)
class InFlight:
    epoch: int
    tag: int
    delivery: Delivery
    properties: Any
    routing_key: str


class Deliveries:
    """The deliveries of the current channel (IO thread only)."""

    def __init__(
        self,
        loop: IoLoop,
        options: RuntimeOptions,
        stats: RuntimeStats,
        *,
        stopping: Callable[[], bool],
        on_settled: Callable[[], None],
    ) -> None:
        """``on_settled`` runs after every settle attempt (the runtime checks its drain)."""
        self._loop = loop
        self._options = options
        self._stats = stats
        self._stopping = stopping
        self._on_settled = on_settled
        self.epoch = 0
        self._channel: Any = None
        self._publisher: ConfirmingPublisher | None = None
        # ascending tags: the broker numbers deliveries in order, and they only leave
        self._inflight: dict[int, InFlight] = {}
        self._parked: dict[UUID, list[InFlight]] = {}
        # executions whose confirmation was confirmed with no delivery parked on it yet: the
        # settler can publish before its handler's Settling outcome reaches this thread
        # deliveries whose execution waits on the settler, and the settler's confirmations
        # that came before their delivery's Settling outcome reached this thread
        self._waiting: dict[UUID, list[InFlight]] = {}
        self._answered: OrderedDict[UUID, Publish] = OrderedDict()
        self._to_ack: list[int] = []  # settled this turn, sent by flush_acks
        self._flush_due = False

    def __len__(self) -> int:
        return len(self._inflight)

    def attach(self, channel: Any, publisher: ConfirmingPublisher) -> None:
        """A new channel is ready: deliveries arrive on it from now on."""
        self._channel = channel
        self._publisher = publisher

    def lose_channel(self) -> None:
        """The channel is gone: its deliveries will be redelivered; their results are stale."""
        self._channel = None
        self._publisher = None
        self.epoch += 1
        metrics.in_flight(-len(self._inflight))
        self._inflight.clear()
        self._parked.clear()
        self._waiting.clear()
        self._to_ack.clear()  # redelivered; an ack on another channel would be an error

    def receive(self, channel: Any, method: Any, properties: Any, body: bytes) -> InFlight | None:
        """A new delivery, now in flight; None if it was handed back (we are stopping)."""
        self._stats.consumed += 1
        if self._stopping():
            channel.basic_nack(method.delivery_tag, requeue=True)
            return None
        delivery = Delivery(
            body=body,
            properties=to_message_properties(properties),
            redelivered=bool(method.redelivered),
            delivery_count=delivery_count_of(properties),
            received_at=datetime.now(UTC),
        )
        item = InFlight(self.epoch, method.delivery_tag, delivery, properties, method.routing_key)
        self._inflight[item.tag] = item
        metrics.in_flight(1)
        return item

    def current(self, item: InFlight) -> bool:
        """Still in flight on the live channel (else its result is stale)."""
        return (
            self._channel is not None
            and item.epoch == self.epoch
            and self._inflight.get(item.tag) is item
        )

    def park(self, execution_id: UUID, item: InFlight) -> None:
        """Its confirmation was refused: keep it unacked until the outbox gets it confirmed
        (a drain hands it back at once: a route may never come)."""
        if not self.current(item):
            return
        if self._stopping():
            self.settle(item, ack=False)
        else:
            self._parked.setdefault(execution_id, []).append(item)

    def wait_on(self, execution_id: UUID, item: InFlight) -> Publish | None:
        """The execution waits on the settler: keep the delivery unacked until its
        confirmation comes (``answer``), as a handler's would (a drain waits for it up to
        the drain timeout). Returns the confirmation if it came first, for this delivery to
        be published and acked now."""
        if not self.current(item):
            return None
        answered = self._answered.pop(execution_id, None)
        if answered is None:
            self._waiting.setdefault(execution_id, []).append(item)
        return answered

    def answer(self, publish: Publish) -> list[InFlight]:
        """The settler's confirmation of an execution: the deliveries waiting on it (each is
        published to and acked on its own confirm). None waiting yet: it is kept a while
        for a delivery whose Settling outcome has not reached this thread."""
        waiting = self._waiting.pop(publish.execution_id, [])
        if not waiting:
            self._answered[publish.execution_id] = publish
            while len(self._answered) > ANSWERED_REMEMBERED:
                self._answered.popitem(last=False)
        return [item for item in waiting if self.current(item)]

    def confirmed(self, execution_id: UUID) -> None:
        """A confirmation of ``execution_id`` is confirmed (the outbox sweep's too): ack the
        requests parked or waiting on it."""
        for parked in self._parked.pop(execution_id, []) + self._waiting.pop(execution_id, []):
            self.settle(parked, ack=True)

    def requeue_parked(self) -> None:
        """Hand back the requests parked on a refused confirmation now (a route may never
        come); those waiting on the settler stay until answered or the drain times out."""
        for parked in [p for items in self._parked.values() for p in items]:
            self.settle(parked, ack=False)
        self._parked.clear()

    def requeue_all(self) -> None:
        if self._inflight:
            log.warning("drain timeout: requeueing %d delivery(ies)", len(self._inflight))
        for item in list(self._inflight.values()):
            self.settle(item, ack=False)

    def dead_letter(self, item: InFlight, outcome: DeadLetter) -> None:
        """Publish the request to the dead-letter exchange, then ack it."""
        assert self._publisher is not None
        properties = dead_letter_properties(item.properties, outcome.reason, outcome.details)

        def done(result: PublishResult) -> None:
            if result is PublishResult.CONFIRMED:
                self._stats.dead_lettered += 1
                metrics.record_dead_letter(outcome.reason.upper())
                self.settle(item, ack=True)
            elif result is PublishResult.LOST:
                self._on_settled()
            else:
                log.warning("dead letter %s by the broker; requeueing", result.value)
                self.requeue(item, f"dead letter {result.value}")

        log.info("dead-lettering a delivery: %s", outcome.reason)
        self._publisher.publish(
            DEAD_LETTER_EXCHANGE,
            item.routing_key,
            item.delivery.body,
            properties,
            mandatory=True,
            on_result=done,
        )

    def requeue(self, item: InFlight, reason: str, *, to_back: bool = False) -> None:
        log.info("requeueing a delivery: %s", reason)
        if to_back and not self._stopping() and self._publisher is not None:
            self._to_back(item)
            return
        if self._stopping() or self._options.requeue_delay_seconds <= 0:
            self.settle(item, ack=False)
            return
        # a short pause so that a claim timeout does not spin through the delivery limit
        self._loop.call_later(
            self._options.requeue_delay_seconds, lambda: self.settle(item, ack=False)
        )

    def _to_back(self, item: InFlight) -> None:
        """Publish a copy at the back of ``execution.requests`` (confirmed), then ack the
        delivery; a nack-requeue would put it back at the head (RabbitMQ 3.x quorum queues),
        in front of every other account's approvals. Any failure falls back to that nack.
        A crash between the confirm and the ack leaves two copies with one key: the second
        is answered from the store, as every redelivery is."""
        assert self._publisher is not None

        def done(result: PublishResult) -> None:
            if result is PublishResult.CONFIRMED:
                self._stats.requeued_to_back += 1
                self.settle(item, ack=True)
            elif result is PublishResult.LOST:
                self._on_settled()
            else:
                self.settle(item, ack=False)

        self._publisher.publish(
            "",
            REQUESTS_QUEUE,
            item.delivery.body,
            back_of_queue_properties(item.properties),
            mandatory=True,
            on_result=done,
        )

    def settle(self, item: InFlight, *, ack: bool) -> None:
        """Ack or nack-with-requeue, on the delivery's own channel only."""
        if not self.current(item):
            self._on_settled()
            return
        del self._inflight[item.tag]
        metrics.in_flight(-1)
        if ack:
            self._to_ack.append(item.tag)
            if not self._flush_due:
                self._flush_due = True
                # a zero delay runs in this very loop turn, after the frames just read
                self._loop.call_later(0, self.flush_acks)
            elapsed = datetime.now(UTC) - item.delivery.received_at
            metrics.observe_end_to_end(elapsed.total_seconds())
        else:
            if self._channel.is_open:  # closing: its deliveries are redelivered anyway
                self._channel.basic_nack(item.tag, requeue=True)
            self._stats.requeued += 1
        self._on_settled()

    def flush_acks(self) -> None:
        """Send the acks settled since the last flush (IO thread; also before closing)."""
        self._flush_due = False
        tags, self._to_ack = self._to_ack, []
        channel = self._channel
        if not tags or channel is None or not channel.is_open:
            return  # a closed channel's deliveries are redelivered
        tags.sort()
        # the oldest delivery still unsettled: a multiple ack must stay below it
        floor = next(iter(self._inflight), None)
        run = len(tags) if floor is None else bisect.bisect_left(tags, floor)
        if run > 1:
            channel.basic_ack(tags[run - 1], multiple=True)
            self._stats.ack_frames += 1
            alone = tags[run:]
        else:
            alone = tags
        for tag in alone:
            channel.basic_ack(tag)
        self._stats.ack_frames += len(alone)
        self._stats.acked += len(tags)
