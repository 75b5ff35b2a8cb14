"""Broker-side helpers for the AMQP, runtime and demo tests (no tests of its own)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions

from worker.amqp.runtime import AmqpRuntime
from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    REQUESTS_QUEUE,
    UNROUTED_QUEUE,
)

WAIT_SECONDS = 30.0


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:])


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    """Poll until ``condition()`` holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ready_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (declare-ok is exact; rabbitmqctl's stats lag ~5 s)."""
    with broker(url) as side:
        count: int = side.channel.queue_declare(queue, passive=True).method.message_count
        return count


def settled_ready(url: str, queue: str, expected: int, seconds: float = 0.5) -> None:
    """With no consumer left, ``queue`` reaches ``expected`` ready messages and stays there
    (unacked messages of a closed channel return to the queue a moment after it closes)."""
    wait_until(lambda: ready_count(url, queue) == expected, f"{expected} ready in {queue}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert ready_count(url, queue) == expected
        time.sleep(0.1)


def reset_vhost(url: str, queues: Sequence[str] = ()) -> None:
    """Delete the contract's queues and exchanges (and ``queues``): a vhost as good as new,
    without the cost of ``rabbitmqctl add_vhost`` (seconds on a loaded machine)."""
    with broker(url) as side:
        for queue in (REQUESTS_QUEUE, DEAD_QUEUE, UNROUTED_QUEUE, *queues):
            side.channel.queue_delete(queue)
        for exchange in (CONFIRMATIONS_EXCHANGE, DEAD_LETTER_EXCHANGE):
            side.channel.exchange_delete(exchange)


def close_connections(url: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost_of(url), "test: broker loss"],
        check=True,
        capture_output=True,
        timeout=60,
    )


@dataclass
class Received:
    routing_key: str
    body: bytes
    properties: Any
    redelivered: bool


class Broker:
    """A blocking connection for the test's side of the broker."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def close(self) -> None:
        if self.connection.is_open:
            # the broker may have closed it first (close_all_connections)
            with contextlib.suppress(pika.exceptions.AMQPError):
                self.connection.close()

    def publish(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        reply_to: str | None = None,
        headers: dict[str, Any] | None = None,
        exchange: str = "",
        routing_key: str = "execution.requests",
    ) -> None:
        self.channel.basic_publish(
            exchange,
            routing_key,
            body,
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=message_id,
                correlation_id=message_id,
                reply_to=reply_to,
                headers=headers,
            ),
            mandatory=True,
        )

    def bind_confirmations(self, queue: str, pattern: str = "confirmation.#") -> None:
        self.channel.exchange_declare(CONFIRMATIONS_EXCHANGE, "topic", durable=True)
        self.channel.queue_declare(queue, durable=True)
        self.channel.queue_bind(queue, CONFIRMATIONS_EXCHANGE, pattern)

    def declare_queue(self, queue: str) -> None:
        self.channel.queue_declare(queue, durable=True)

    def take(self, queue: str, count: int, seconds: float = WAIT_SECONDS) -> list[Received]:
        """Get exactly ``count`` messages from ``queue`` (ack them), failing on a timeout."""
        got: list[Received] = []
        deadline = time.monotonic() + seconds
        while len(got) < count:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{queue}: got {len(got)} of {count} messages")
                self.connection.sleep(0.05)
                continue
            got.append(Received(method.routing_key, body, props, method.redelivered))
        return got

    def drain(self, queue: str) -> list[Received]:
        """Whatever is in ``queue`` right now."""
        got: list[Received] = []
        while True:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append(Received(method.routing_key, body, props, method.redelivered))


@contextmanager
def broker(url: str) -> Iterator[Broker]:
    side = Broker(url)
    try:
        yield side
    finally:
        side.close()


class Running:
    """An :class:`AmqpRuntime` running on a background thread."""

    def __init__(self, runtime: AmqpRuntime) -> None:
        self.runtime = runtime
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name="runtime", daemon=True)

    def _run(self) -> None:
        self.exit_code = self.runtime.run()

    def start(self, wait_consuming: bool = True) -> Running:
        self._thread.start()
        if wait_consuming:
            wait_until(self.runtime.consuming.is_set, "the runtime to consume")
        return self

    def join(self, seconds: float = WAIT_SECONDS) -> int:
        self._thread.join(seconds)
        assert not self._thread.is_alive(), "the runtime did not return"
        assert self.exit_code is not None
        return self.exit_code

    def stop(self, seconds: float = WAIT_SECONDS) -> int:
        self.runtime.stop()
        return self.join(seconds)


def ids_of(messages: Sequence[Received]) -> list[str]:
    return [m.properties.message_id for m in messages]
