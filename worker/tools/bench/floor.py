"""The bench's floor: a bare forwarder doing only the durable work a correct worker cannot avoid.

Per message, and nothing else: commit an intent row (one synchronous PostgreSQL commit),
commit the final row (a second one), publish a persistent, mandatory confirmation and wait
for the broker's confirm, then ack the request. It is the naive way to do it: every step
waits for the previous one. ``concurrency`` consumers (each its own connection, channel with
prefetch 1 and database connection) give it the same number of messages in flight as a
worker with that prefetch.

Run as ``python -m worker.tools.bench.floor`` (settings from the environment, see ``main``); it
serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions
import psycopg

from worker.config import mask_url

FLOOR_QUEUE = "bench.floor.requests"
FLOOR_EXCHANGE = "bench.floor.confirmations"
FLOOR_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bench_floor;
CREATE TABLE IF NOT EXISTS bench_floor.executions (
  execution_id text PRIMARY KEY,
  state text NOT NULL,
  request jsonb,
  received_at timestamptz NOT NULL DEFAULT now(),
  completed_at timestamptz
);
"""
ROUTING_KEY = "confirmation.filled.EURUSD"


def floor_queue_arguments() -> dict[str, Any]:
    """The same kind of queue as ``execution.requests``: quorum."""
    return {"x-queue-type": "quorum"}


def declare_floor(channel: Any) -> None:
    """Declare the floor's request queue and confirmation exchange (blocking channel)."""
    channel.queue_declare(FLOOR_QUEUE, durable=True, arguments=floor_queue_arguments())
    channel.exchange_declare(FLOOR_EXCHANGE, exchange_type="topic", durable=True)


def prepare_database(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(FLOOR_SCHEMA)


class _Consumer:
    """One consumer: its own AMQP connection, confirming channel and database connection."""

    def __init__(self, amqp_url: str, database_url: str, stop: threading.Event) -> None:
        self._stop = stop
        self._db = psycopg.connect(database_url, autocommit=True)
        params = pika.URLParameters(amqp_url)
        params.client_properties = {"connection_name": "bench floor"}
        self._connection = pika.BlockingConnection(params)
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()
        self._channel.basic_qos(prefetch_count=1)
        declare_floor(self._channel)

    def run(self) -> None:
        try:
            for method, properties, body in self._channel.consume(
                FLOOR_QUEUE, inactivity_timeout=0.2
            ):
                if self._stop.is_set():
                    break
                if method is None:
                    continue
                self._forward(method, properties, body)
        finally:
            self._close()

    def _forward(self, method: Any, properties: Any, body: bytes) -> None:
        key = properties.message_id or str(method.delivery_tag)
        # commit 1: the intent, before any broker call
        self._db.execute(
            "INSERT INTO bench_floor.executions (execution_id, state, request)"
            " VALUES (%s, 'SUBMITTING', %s) ON CONFLICT DO NOTHING",
            (key, body.decode("utf-8")),
        )
        # commit 2: the final row
        self._db.execute(
            "UPDATE bench_floor.executions SET state = 'FILLED', completed_at = now()"
            " WHERE execution_id = %s",
            (key,),
        )
        confirmation = json.dumps({"execution_id": key, "status": "FILLED"}).encode()
        # a persistent, mandatory publish; the blocking channel waits for the confirm
        self._channel.basic_publish(
            FLOOR_EXCHANGE,
            ROUTING_KEY,
            confirmation,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=key,
                correlation_id=properties.correlation_id,
            ),
            mandatory=True,
        )
        self._channel.basic_ack(method.delivery_tag)

    def _close(self) -> None:
        for close in (self._channel.cancel, self._connection.close, self._db.close):
            with contextlib.suppress(pika.exceptions.AMQPError, psycopg.Error, OSError):
                close()


def run_floor(amqp_url: str, database_url: str, concurrency: int, stop: threading.Event) -> int:
    """Forward until ``stop`` is set; 0 when every consumer ended cleanly."""
    prepare_database(database_url)
    consumers = [_Consumer(amqp_url, database_url, stop) for _ in range(concurrency)]
    errors: list[BaseException] = []

    def guarded(consumer: _Consumer) -> None:
        try:
            consumer.run()
        except Exception as exc:
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=guarded, args=(c,), name=f"floor-{i}", daemon=True)
        for i, c in enumerate(consumers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)
    if errors:
        print(f"bench floor: {type(errors[0]).__name__}: {errors[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.tools.bench.floor N``; URLs from BENCH_FLOOR_AMQP_URL/_DB_URL."""
    args = list(sys.argv[1:] if argv is None else argv)
    concurrency = int(args[0]) if args else 1
    amqp_url = os.environ["BENCH_FLOOR_AMQP_URL"]
    database_url = os.environ["BENCH_FLOOR_DB_URL"]
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda _n, _f: stop.set())
    try:
        return run_floor(amqp_url, database_url, concurrency, stop)
    except (pika.exceptions.AMQPError, psycopg.Error) as exc:
        print(f"bench floor at {mask_url(amqp_url)}: {type(exc).__name__}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
