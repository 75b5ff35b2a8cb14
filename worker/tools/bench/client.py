"""The bench's client: it publishes approvals and times their confirmations as they arrive."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions

from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    REQUESTS_QUEUE,
    dead_queue_arguments,
    requests_queue_arguments,
)
from worker.tools.bench import report as bench_report
from worker.tools.bench.counts import SIM_SYMBOL, UNITS, BenchError
from worker.tools.bench.floor import FLOOR_EXCHANGE, declare_floor
from worker.tools.publish import OutgoingMessage, approved_trade, rpm_output

# the instant a message of the offered-rate runs was due to be sent, in microseconds since the
# epoch: its latency runs from there, not from the (maybe later) actual send
INTENDED_HEADER = "x-bench-intended-us"


def _client_parameters(url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = 0  # the client idles while a phase runs; never time it out
    params.client_properties = {"connection_name": name}
    return params


class Arrivals:
    """Confirmations of the worker and of the floor, timed as they arrive (own thread)."""

    def __init__(self, url: str) -> None:
        self.times: dict[str, float] = {}
        self.statuses: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise BenchError(f"cannot consume confirmations: {self._error!r}")

    def _run(self, url: str) -> None:
        try:
            connection = pika.BlockingConnection(_client_parameters(url, "bench observer"))
            channel = connection.channel()
            channel.exchange_declare(CONFIRMATIONS_EXCHANGE, exchange_type="topic", durable=True)
            channel.exchange_declare(FLOOR_EXCHANGE, exchange_type="topic", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, CONFIRMATIONS_EXCHANGE, "confirmation.#")
            channel.queue_bind(queue, FLOOR_EXCHANGE, "#")
            channel.basic_consume(queue, self._on_message, auto_ack=True)
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.1)
        except Exception as exc:
            self._error = exc
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def _on_message(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        now = time.perf_counter()
        key = properties.correlation_id
        try:
            status = str(json.loads(body).get("status"))
        except ValueError:
            status = "unparsable"
        with self._cond:
            if key not in self.times:
                self.times[key] = now
                self.statuses[status] += 1
            self._cond.notify_all()

    def wait(self, keys: Sequence[str], timeout: float, on_progress: Progressed) -> None:
        """Until every key arrived; raises BenchError once none arrived for ``timeout`` seconds.

        The deadline moves with each arrival: a slow consumer that keeps answering (the worker
        on a hard server, waiting for each fill's deal) is waited for; a stuck one is not.
        """
        deadline = time.monotonic() + timeout
        last = 0
        with self._cond:
            while True:
                done = sum(1 for key in keys if key in self.times)
                on_progress(done, len(keys))
                if done == len(keys):
                    return
                if done > last:
                    last, deadline = done, time.monotonic() + timeout
                if self._error is not None:
                    raise BenchError(f"observer failed: {type(self._error).__name__}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"timed out: {done} of {len(keys)} confirmations arrived,"
                        f" none in the last {timeout:g} s"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_first(self, keys: Sequence[str], timeout: float) -> None:
        """Until any one of ``keys`` arrived; raises BenchError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(key in self.times for key in keys):
                if self._error is not None:
                    raise BenchError(f"observer failed: {type(self._error).__name__}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out: none of {len(keys)} confirmations arrived")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


Progressed = Callable[[int, int], None]


class Publisher:
    """Requests, one at a time with a publisher confirm each (main thread only)."""

    def __init__(self, url: str, delivery_limit: int) -> None:
        self.connection = pika.BlockingConnection(_client_parameters(url, "bench publisher"))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        # the worker's topology, so a backlog can wait in the queue before a worker starts
        channel = self.channel
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
        channel.queue_declare(DEAD_QUEUE, durable=True, arguments=dead_queue_arguments())
        channel.queue_bind(DEAD_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#")
        channel.queue_declare(
            REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(delivery_limit)
        )
        channel.exchange_declare(CONFIRMATIONS_EXCHANGE, exchange_type="topic", durable=True)
        declare_floor(channel)

    @property
    def server_version(self) -> str | None:
        properties = getattr(self.connection._impl, "server_properties", None)
        return bench_report.rabbitmq_version(properties)

    def publish(self, queue: str, message: OutgoingMessage) -> None:
        self.channel.basic_publish(
            "", queue, message.body, properties=message.properties(), mandatory=True
        )

    def consumers(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).method.consumer_count
        return count

    def messages(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).method.message_count
        return count

    def sleep(self, seconds: float) -> None:
        self.connection.sleep(seconds)

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.connection.close()


def approvals(prefix: str, count: int) -> list[OutgoingMessage]:
    """``count`` EURUSD approvals, buys and sells alternating (no position piles up)."""
    messages = []
    for i in range(count):
        trade = approved_trade(SIM_SYMBOL, 1 if i % 2 == 0 else -1, UNITS)
        order_id = f"{prefix}-{i}"
        body = json.dumps(rpm_output(trade, order_id=order_id)).encode()
        messages.append(OutgoingMessage(body, order_id, correlation_id=order_id))
    return messages


def stamped(message: OutgoingMessage, intended_epoch_s: float) -> OutgoingMessage:
    """``message`` with its intended send time (epoch seconds) in ``INTENDED_HEADER``, in µs."""
    headers = {**(message.headers or {}), INTENDED_HEADER: round(intended_epoch_s * 1e6)}
    return dataclasses.replace(message, headers=headers)
