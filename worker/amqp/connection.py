"""The connection to RabbitMQ: connect, reconnect with backoff, channel, consumer, fatal exits.

One connection and one channel at a time (IO thread only). The steps follow pika's
asynchronous consumer example: connection open -> channel open -> publisher confirms ->
declare the topology -> QoS -> (the runtime sweeps the outbox) -> consume. A lost
connection or channel is reported to the runtime and retried, on the next node of the
cluster first (``RABBITMQ_URL`` may name several: worker/amqp/nodes.py), with exponential
backoff once every node failed in a row;
wrong credentials (77) and a topology mismatch (78) end the process instead, since
retrying cannot help.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from worker.amqp.loop import IoLoop
from worker.amqp.nodes import NodeRotation
from worker.amqp.options import RuntimeOptions, RuntimeStats
from worker.amqp.publisher import STUCK_NACK_SECONDS, ConfirmingPublisher
from worker.amqp.topology import (
    PRECONDITION_FAILED,
    REQUESTS_QUEUE,
    TopologyMismatch,
    declare,
    describe_mismatch,
)
from worker.config import mask_url
from worker.errors import ExitCode
from worker.observability import metrics

log = logging.getLogger(__name__)


OnMessage = Callable[[Any, Any, Any, bytes], None]


class Connection:
    """Keeps a consuming channel open until :meth:`close` or a fatal error (IO thread)."""

    def __init__(
        self,
        url: str,
        loop: IoLoop,
        options: RuntimeOptions,
        stats: RuntimeStats,
        consuming: threading.Event,
        *,
        stopping: Callable[[], bool],
        on_message: OnMessage,
        on_ready: Callable[[Any, ConfirmingPublisher], None],
        on_lost: Callable[[], None],
        on_closed: Callable[[], None],
    ) -> None:
        """``on_ready(channel, publisher)``: declared, QoS set; call :meth:`start_consuming`.
        ``on_lost()``: the channel is gone (before its publishes are failed).
        ``on_closed()``: nothing left to do; stop the IO loop."""
        self._rotation = NodeRotation(url)  # the cluster's nodes, shuffled
        self.node: str | None = None  # host:port of the node connected to (readiness, metrics)
        self._loop = loop
        self._options = options
        self._stats = stats
        self._consuming = consuming
        self._stopping = stopping
        self._on_message = on_message
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._on_closed = on_closed
        self.closing = False  # closing on purpose (drained, or fatal): no reconnect
        self.exit_code = ExitCode.OK
        self.error: str | None = None
        self._connection: Any = None
        self._channel: Any = None
        self._publisher: ConfirmingPublisher | None = None
        self._consumer_tag: str | None = None
        self._declaring = False
        self._reconnect_delay = options.reconnect_min_delay_seconds

    @property
    def has_channel(self) -> bool:
        return self._channel is not None

    def connect(self) -> None:
        if self._stopping():
            self._on_closed()
            return
        node = self._rotation.current
        params = node.parameters()
        params.client_properties = {"connection_name": self._options.connection_name}
        log.info("connecting to RabbitMQ node %s", node.name)
        self._connection = pika.SelectConnection(
            params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._loop.pika,
        )

    def start_consuming(self) -> None:
        if self._channel is None or self._stopping():
            return
        self._consumer_tag = self._channel.basic_consume(
            REQUESTS_QUEUE, self._on_message, callback=lambda _f: self._on_consuming()
        )

    def cancel_consumer(self) -> None:
        """Stop new deliveries (drain): the channel stays open to settle those in flight."""
        self._consuming.clear()
        if self._channel is not None and self._consumer_tag is not None:
            self._channel.basic_cancel(self._consumer_tag)

    def close(self) -> None:
        """Close the connection on purpose; ``on_closed`` follows."""
        self.closing = True
        self._consuming.clear()
        self._close_or_stop()

    # ----------------------------------------------------------------- connection

    def _on_connection_open(self, connection: Any) -> None:
        self._rotation.connected()
        self.node = self._rotation.current.name
        metrics.set_rabbitmq_node(self.node, [node.name for node in self._rotation.nodes])
        log.info("connected to RabbitMQ node %s", self.node)
        self._stats.connections += 1
        if self._stats.connections > 1:
            metrics.record_reconnect("rabbitmq")
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: Any, error: BaseException) -> None:
        self._connection = None
        if isinstance(
            error,
            pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError,
        ):
            self._fatal(
                ExitCode.ACCESS_REFUSED,
                f"RabbitMQ refused access at {mask_url(self._rotation.current.url)}",
            )
            return
        log.warning(
            "cannot connect to RabbitMQ node %s: %s",
            self._rotation.current.name,
            type(error).__name__,
        )
        self._schedule_reconnect(next_node=True)

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._lose_channel()
        self._connection = None
        lost, self.node = self.node, None
        metrics.set_rabbitmq_node(None, [node.name for node in self._rotation.nodes])
        if self.closing or self._stopping():
            self._on_closed()
            return
        log.warning("RabbitMQ connection to node %s lost: %s", lost, reason)
        # the node may be dead: another one is tried first (a cluster serves the quorum
        # queue from any node while a majority of its members is up)
        self._schedule_reconnect(next_node=True)

    def _schedule_reconnect(self, *, next_node: bool = False) -> None:
        if self.closing or self._stopping():
            self._on_closed()
            return
        if next_node and len(self._rotation.nodes) > 1 and not self._rotation.advance():
            # another node of the round: at once (the backoff is for a whole round failing)
            log.info("trying RabbitMQ node %s", self._rotation.current.name)
            self._loop.call_later(self._options.reconnect_min_delay_seconds, self.connect)
            return
        delay = self._reconnect_delay
        self._reconnect_delay = min(delay * 2, self._options.reconnect_max_delay_seconds)
        log.info("reconnecting in %.1f s", delay)
        self._loop.call_later(delay, self.connect)

    # ----------------------------------------------------------------- channel

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)
        self._publisher = ConfirmingPublisher(
            channel, on_ready=self._declare, on_stuck=self._on_publishes_refused
        )

    def _declare(self) -> None:
        self._declaring = True
        declare(self._channel, self._options.delivery_limit, self._on_declared)

    def _on_declared(self) -> None:
        self._declaring = False
        self._channel.basic_qos(
            prefetch_count=self._options.channel_prefetch, callback=self._on_qos
        )

    def _on_qos(self, _frame: Any) -> None:
        assert self._publisher is not None
        self._on_ready(self._channel, self._publisher)

    def _on_consuming(self) -> None:
        self._reconnect_delay = self._options.reconnect_min_delay_seconds
        self._consuming.set()
        log.info(
            "consuming %s (prefetch %d: %d handlers, %d waiting on the settler)",
            REQUESTS_QUEUE,
            self._options.channel_prefetch,
            self._options.prefetch,
            self._options.settling_prefetch,
        )

    def _on_cancelled_by_broker(self, _frame: Any) -> None:
        """Basic.Cancel from the broker (queue deleted, failover): nothing arrives any more.

        Handled like a lost channel: readiness drops at once, the channel is closed (its
        deliveries are redelivered, their late results dropped as stale), and the reconnect
        re-declares the topology and consumes again. pika calls this only for a cancel the
        broker started, not for the answer to our own ``basic_cancel`` (pika
        ``Channel.add_on_cancel_callback``)."""
        self._consuming.clear()
        self._stats.consumer_cancels += 1
        if self.closing or self._stopping():
            return
        log.warning("the broker cancelled the consumer on %s; reconnecting", REQUESTS_QUEUE)
        if self._channel is not None and self._channel.is_open:
            self._channel.close()

    def _on_publishes_refused(self) -> None:
        """The broker has only nacked this channel's publishes for a while: a new channel (on
        the next node) instead, as for a cancelled consumer. The nacked confirmations stay in
        the outbox and go out again on the new channel."""
        if self.closing or self._stopping():
            return
        log.warning(
            "RabbitMQ node %s has refused every publish for %.0f s; reconnecting",
            self.node,
            STUCK_NACK_SECONDS,
        )
        if self._channel is not None and self._channel.is_open:
            self._channel.close()

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        declaring = self._declaring
        self._lose_channel()
        if (
            declaring
            and isinstance(reason, pika.exceptions.ChannelClosedByBroker)
            and reason.reply_code == PRECONDITION_FAILED
        ):
            message = describe_mismatch(reason.reply_text)
            self._fatal(ExitCode.TOPOLOGY_MISMATCH, str(TopologyMismatch(message)))
            return
        connection = self._connection
        if connection is not None and connection.is_open:
            if not (self.closing or self._stopping()):
                log.warning("channel closed: %s", reason)
            connection.close()

    def _lose_channel(self) -> None:
        """The channel is gone: its deliveries will be redelivered, its confirms never come."""
        self._consuming.clear()
        self._channel = None
        self._consumer_tag = None
        self._declaring = False
        self._on_lost()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.fail_all()

    # ----------------------------------------------------------------- exits

    def _fatal(self, code: ExitCode, message: str) -> None:
        self.error = message
        self.exit_code = code
        log.error("%s", message)
        self.closing = True
        self._close_or_stop()

    def _close_or_stop(self) -> None:
        """Close the connection (its close callback stops the loop), or stop the loop now."""
        connection = self._connection
        if connection is None or connection.is_closed:
            self._on_closed()
        elif not connection.is_closing:
            connection.close()
