"""Traffic of deploy/check-ha.sh: approvals published at a steady rate, confirmations read.

Runs in the worker image on the compose network (``RABBITMQ_URL`` names every node). Both
halves survive the loss of any one node: each reconnects to the next node of the list and
carries on. A publish whose confirm was lost with its node is published again (same
``order_id``: the worker answers a copy from its store and never sends it twice), as the
RPM does. Confirmations are read from a quorum queue of the drill's own, bound to
``execution.confirmations`` with ``#``, so none is lost with a node either.

``traffic`` writes to ``--out``: ``confirmations.jsonl`` (one line per confirmation copy,
with the wall clock it arrived at) and ``published.json`` (the order ids); it exits 0 once
every approval has a final (non-provisional) confirmation, 1 at ``--timeout``.

``verify`` (on the host, once check-ha.sh has added the broker's deals ``deals.jsonl`` and
the new primary's rows ``rows.txt``) judges them: one final answer per approval, every order
on the books named by its approval's confirmation (a large approval is several chunk
orders), none of no approval, a row for every approval; and prints how long confirmations
stopped after each failure. Exit 1 if any check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import pika
import pika.exceptions

from schemas.identity import order_magic_for
from worker.amqp.nodes import connection_parameters
from worker.config import Settings
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


def verify(
    out: pathlib.Path, node: str, rabbitmq_stopped_at: float, postgres_stopped_at: float
) -> int:
    published = set(json.loads((out / "published.json").read_text()))
    copies = [json.loads(line) for line in (out / "confirmations.jsonl").open()]
    answers: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)  # order id -> message id
    for copy in copies:
        if not copy["provisional"] and copy["order_id"] in published:
            answers[copy["order_id"]][copy["message_id"]] = copy
    unanswered = published - set(answers)
    # copies of one message (the same message_id) are allowed; two answers are not
    conflicting = [
        o for o, by_id in answers.items()
        if len({(a["execution_id"], a["status"]) for a in by_id.values()}) > 1
    ]  # fmt: skip
    final = {
        o: max(by_id.values(), key=lambda a: a["version"] or 0) for o, by_id in answers.items()
    }
    magic = Settings().magic
    book: dict[int, set[int]] = defaultdict(set)  # order magic -> orders
    order_of_deal: dict[int, int] = {}
    for line in (out / "deals.jsonl").open():
        deal = json.loads(line)
        book[deal["magic"]].add(deal["order"])
        order_of_deal[deal["ticket"]] = deal["order"]
    magics = {
        a["execution_id"]: order_magic_for(uuid.UUID(a["execution_id"]), magic)
        for a in final.values()
    }
    unnamed = sum(
        len(
            book.get(magics[a["execution_id"]], set())
            - {order_of_deal.get(d) for d in a["broker_deals"]}
        )
        for a in final.values()
    )
    foreign = sum(len(orders) for m, orders in book.items() if m not in set(magics.values()))
    rows = dict(line.split("|") for line in (out / "rows.txt").read_text().split())
    unrowed = [a for a in final.values() if a["execution_id"] not in rows]
    times = sorted(c["t"] for c in copies)
    statuses = Counter(a["status"] for a in final.values())
    reasons = Counter(a["rejection_reason"] for a in final.values() if a["rejection_reason"])
    print(
        f"check-ha: {len(published)} approvals, {len(final)} answered ({len(copies)}"
        f" confirmation copies), {dict(statuses)}, rejections {dict(reasons)}"
    )
    print(
        f"check-ha: broker orders {sum(len(v) for v in book.values())}; not in their approval's"
        f" confirmation {unnamed}, of no approval {foreign}; conflicting answers"
        f" {len(conflicting)}; no row on the new primary {len(unrowed)};"
        f" unanswered {len(unanswered)}"
    )
    print(
        f"check-ha: after stopping RabbitMQ node {node}: {_resumed(times, rabbitmq_stopped_at)};"
        f" after stopping the PostgreSQL primary: {_resumed(times, postgres_stopped_at)}"
    )
    return 1 if unanswered or conflicting or unnamed or foreign or unrowed else 0


def _resumed(times: list[float], stopped_at: float) -> str:
    """The first confirmation after ``stopped_at``, and the longest pause in the 30 s after
    it (a confirmation in flight then, or one from the worker not hit, may come at once)."""
    after = [t for t in times if t > stopped_at]
    if not after:
        return "no confirmation"
    window = [stopped_at] + [t for t in after if t < stopped_at + 30]
    pause = max(b - a for a, b in itertools.pairwise(window))
    return f"first after {after[0] - stopped_at:.1f} s, longest pause {pause:.1f} s"


def traffic(args: argparse.Namespace) -> int:
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


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("traffic", help="publish approvals, read their confirmations")
    run.add_argument("--count", type=int, default=240)
    run.add_argument("--rate", type=float, default=10.0, help="approvals per second")
    run.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/out"))
    run.add_argument("--timeout", type=float, default=600.0)
    check = commands.add_parser("verify", help="judge a finished drill's files")
    check.add_argument("--out", type=pathlib.Path, required=True)
    check.add_argument("--node", required=True)
    check.add_argument("--rabbitmq-stopped-at", type=float, required=True)
    check.add_argument("--postgres-stopped-at", type=float, required=True)
    args = parser.parse_args()
    if args.command == "verify":
        return verify(args.out, args.node, args.rabbitmq_stopped_at, args.postgres_stopped_at)
    return traffic(args)


if __name__ == "__main__":
    raise SystemExit(main())
