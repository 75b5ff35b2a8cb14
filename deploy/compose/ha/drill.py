"""Traffic of deploy/check-ha.sh: approvals published at a steady rate, confirmations read.

Runs in the worker image on the compose network (``RABBITMQ_URL`` names every node). Both
halves survive the loss of any one node: each reconnects to the next node of the list and
carries on. A publish whose confirm was lost with its node is published again (same
``order_id``: the worker answers a copy from its store and never sends it twice), as the
RPM does. Confirmations are read from a quorum queue of the drill's own, bound to
``execution.confirmations`` with ``#``, so none is lost with a node either.

Writes to ``--out``: ``confirmations.jsonl`` (one line per confirmation copy, with the wall
clock it arrived at) and ``published.json`` (the order ids); exits 0 once every approval
has a final (non-provisional) confirmation, 1 at ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import threading
import time
from typing import Any

import pika
import pika.exceptions

from worker.amqp.nodes import connection_parameters
from worker.tools.publish import (
    OutgoingMessage,
    order_id_of,
    outgoing,
    sample_approvals,
    utc_naive_now,
)

QUEUE = "ha-drill.confirmations"
FAILURES = (pika.exceptions.AMQPError, OSError)


def connect(url: str) -> pika.BlockingConnection:
    while True:
        try:
            return pika.BlockingConnection(connection_parameters(url, shuffle=True))
        except FAILURES as failed:
            print(f"drill: no node answers ({type(failed).__name__}); retrying", flush=True)
            time.sleep(0.5)


def declare_queue(url: str) -> None:
    connection = connect(url)
    channel = connection.channel()
    channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(QUEUE, "execution.confirmations", routing_key="#")
    connection.close()


def fresh(document: dict[str, Any]) -> OutgoingMessage:
    """The approval as the RPM would publish it now (an approval older than the worker's
    approval TTL is refused as stale)."""
    now = utc_naive_now()
    document["timestamp"] = now
    document["decision"]["approved_trade"]["timestamp"] = now
    return outgoing(document)


def publish(url: str, documents: list[dict[str, Any]], rate: float) -> None:
    connection = None
    started = time.monotonic()
    for index, document in enumerate(documents):
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        message = fresh(document)
        while True:
            try:
                if connection is None or connection.is_closed:
                    connection = connect(url)
                    channel = connection.channel()
                    channel.confirm_delivery()
                channel.basic_publish(
                    "", "execution.requests", message.body, message.properties(), mandatory=True
                )
                break
            except FAILURES as failed:
                print(f"drill: publish {index} again ({type(failed).__name__})", flush=True)
                connection = None
                time.sleep(0.2)
    print(f"drill: published {len(documents)}", flush=True)


def consume(url: str, expected: set[str], out: pathlib.Path, done: threading.Event) -> None:
    final: set[str] = set()
    with open(out / "confirmations.jsonl", "a", encoding="utf-8") as log:
        while not done.is_set():
            try:
                connection = connect(url)
                channel = connection.channel()
                for method, properties, body in channel.consume(QUEUE, inactivity_timeout=1.0):
                    if method is None:
                        if final >= expected:
                            done.set()
                        if done.is_set():
                            break
                        continue
                    doc: dict[str, Any] = json.loads(body)
                    line = {
                        "t": time.time(),
                        "message_id": properties.message_id,
                        "order_id": doc.get("order_id"),
                        "execution_id": doc.get("execution_id"),
                        "status": doc.get("status"),
                        "version": doc.get("version"),
                        "provisional": doc.get("provisional"),
                        "rejection_reason": doc.get("rejection_reason"),
                        "broker_deals": doc.get("broker_deals"),
                    }
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    if not doc.get("provisional"):
                        final.add(str(doc.get("order_id")))
                    channel.basic_ack(method.delivery_tag)
                    if len(final) % 20 == 0:
                        print(f"drill: {len(final)} confirmed", flush=True)
                connection.close()
            except FAILURES as failed:
                print(f"drill: consumer reconnects ({type(failed).__name__})", flush=True)
                time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--rate", type=float, default=10.0, help="approvals per second")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/out"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    url = os.environ["RABBITMQ_URL"]
    declare_queue(url)
    documents = sample_approvals(args.count, ["EURUSD", "GBPUSD"], 27)
    expected = {str(order_id_of(doc)) for doc in documents}
    (args.out / "published.json").write_text(json.dumps(sorted(expected)))
    done = threading.Event()
    consumer = threading.Thread(target=consume, args=(url, expected, args.out, done), daemon=True)
    consumer.start()
    publish(url, documents, args.rate)
    consumer.join(args.timeout)
    done.set()
    return 0 if not consumer.is_alive() else 1


if __name__ == "__main__":
    raise SystemExit(main())
