"""Asynchronous publisher confirms on one pika channel (IO thread only).

Every publish gets the channel's next delivery tag and a callback; the broker's
``Basic.Ack``/``Basic.Nack`` (possibly ``multiple``) resolve them in order. A mandatory
message that no queue accepted comes back as ``Basic.Return`` *before* its ack, so the
oldest unresolved publish with the same exchange, routing key and message id is marked
returned and its ack reported as :attr:`PublishResult.RETURNED`. Many messages stay in
flight; nothing waits for a confirm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pika
import pika.exceptions

log = logging.getLogger(__name__)

PERSISTENT = 2
# A channel whose publishes the broker has only nacked for this long is given up (``on_stuck``):
# a quorum queue that lost its majority can leave the channel's enqueuer state refusing every
# publish after the majority is back (rabbitmq/rabbitmq-server#15333 describes a channel
# rejecting once its enqueuer found no replica); a new channel starts afresh.
STUCK_NACK_SECONDS = 15.0


class PublishResult(Enum):
    CONFIRMED = "confirmed"  # the broker took responsibility and routed it
    RETURNED = "returned"  # mandatory and unroutable (no queue bound)
    NACKED = "nacked"  # the broker could not take it
    LOST = "lost"  # the channel closed before the confirm arrived: outcome unknown


OnResult = Callable[[PublishResult], None]


@dataclass
class _Pending:
    exchange: str
    routing_key: str
    message_id: str | None
    on_result: OnResult
    returned: bool = False


class ConfirmingPublisher:
    """Publisher confirms for one channel; create it on a freshly opened channel."""

    def __init__(
        self,
        channel: Any,
        on_ready: Callable[[], None],
        *,
        on_stuck: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._channel = channel
        self._next_tag = 1
        self._pending: dict[int, _Pending] = {}
        self._on_stuck = on_stuck
        self._clock = clock
        self._nacked_since: float | None = None  # the first nack since the last ack
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: on_ready())

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        *,
        mandatory: bool,
        on_result: OnResult,
    ) -> None:
        """Publish; ``on_result`` is called once, on the IO thread, when the outcome is known.

        On a channel that is closing (given up by ``on_stuck``, or closed by the broker,
        before its close callback has run) the publish is :attr:`PublishResult.LOST` at
        once, as those in flight are when it closes (:meth:`fail_all`): pika would raise,
        and the IO thread with it."""
        if not self._channel.is_open:
            on_result(PublishResult.LOST)
            return
        try:
            self._channel.basic_publish(
                exchange, routing_key, body, properties=properties, mandatory=mandatory
            )
        except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
            on_result(PublishResult.LOST)
            return
        self._pending[self._next_tag] = _Pending(
            exchange, routing_key, properties.message_id, on_result
        )
        self._next_tag += 1

    def fail_all(self) -> None:
        """The channel is gone: every unresolved publish is :attr:`PublishResult.LOST`."""
        pending, self._pending = self._pending, {}
        for item in pending.values():
            self._resolve(item, PublishResult.LOST)

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        for item in self._pending.values():
            if (
                not item.returned
                and item.exchange == method.exchange
                and item.routing_key == method.routing_key
                and item.message_id == properties.message_id
            ):
                item.returned = True
                return
        log.warning(
            "returned message (exchange %r, routing key %r) matches no publish in flight",
            method.exchange,
            method.routing_key,
        )

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tag: int = method.delivery_tag
        if method.multiple:
            tags = []
            for t in self._pending:  # ascending: tags are inserted in order
                if tag and t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag] if tag in self._pending else []
        self._note(acked, len(tags))
        for t in tags:
            item = self._pending.pop(t)
            if not acked:
                result = PublishResult.NACKED
            elif item.returned:
                result = PublishResult.RETURNED
            else:
                result = PublishResult.CONFIRMED
            self._resolve(item, result)

    def _note(self, acked: bool, count: int) -> None:
        """Track a streak of nacks; call ``on_stuck`` once it has lasted STUCK_NACK_SECONDS."""
        if acked:
            self._nacked_since = None
            return
        if not count:
            return
        now = self._clock()
        if self._nacked_since is None:
            self._nacked_since = now
        elif now - self._nacked_since >= STUCK_NACK_SECONDS and self._on_stuck is not None:
            on_stuck, self._on_stuck = self._on_stuck, None  # once per channel
            on_stuck()

    @staticmethod
    def _resolve(item: _Pending, result: PublishResult) -> None:
        try:
            item.on_result(result)
        except Exception:
            log.exception("publish result callback failed")
