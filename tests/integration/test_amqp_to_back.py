"""Requeue(to_back=True) against the real RabbitMQ when the broker refuses the copy.

The runtime publishes a copy of the delivery at the back of ``execution.requests`` and acks
the original only once the broker confirmed the copy. A refused copy (nacked: the queue is
full under ``overflow: reject-publish``) must leave the original with the broker (nacked
with requeue), never acked: the approval would be gone, with no copy anywhere.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace

import pika.exceptions
import pytest

from tests.containers import Broker as Services
from tests.integration.test_amqp_runtime import OPTIONS, MemoryOutbox, confirmation_for
from tests.integration.test_amqp_support import (
    Running,
    broker,
    settled_ready,
    vhost_of,
    wait_until,
)
from worker.amqp.runtime import AmqpRuntime
from worker.amqp.topology import DEAD_QUEUE, REQUESTS_QUEUE
from worker.errors import ExitCode
from worker.execution.outcome import DeadLetter, Delivery, Outcome, Requeue

APPROVAL = "approval-to-back"
FILLERS = 10  # at most; the broker refuses one well before (max-length 1)


class WaitingAccount:
    """The pipeline as the runtime sees it: the approval's first delivery waits for
    ``go`` (its account busy), then goes to the back of the queue; any later delivery of
    it is executed (a confirmation). Fillers are dead-lettered."""

    def __init__(self, outbox: MemoryOutbox) -> None:
        self.outbox = outbox
        self.lock = threading.Lock()
        self.seen: list[Delivery] = []
        self.go = threading.Event()

    def approvals(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.seen if d.properties.message_id == APPROVAL]

    def __call__(self, delivery: Delivery) -> Outcome:
        with self.lock:
            self.seen.append(delivery)
        message_id = delivery.properties.message_id or ""
        if message_id != APPROVAL:
            return DeadLetter("TEST_FILLER", "filled the queue")
        if len(self.approvals()) == 1:
            self.go.wait(30)
            return Requeue("no MT5 session of account a available", to_back=True)
        publish = confirmation_for(message_id, None)
        self.outbox.add(publish)
        return publish


@pytest.fixture
def vhost_url(new_vhost: Callable[[], str], rabbitmq_broker: Services) -> str:
    url = new_vhost()
    # a policy, not queue arguments: the runtime declares the contract's arguments
    rabbitmq_broker.ctl(
        "set_policy",
        "-p",
        vhost_of(url),
        "requests-full",
        "^execution\\.requests$",
        json.dumps({"max-length": 1, "overflow": "reject-publish"}),
        "--apply-to",
        "queues",
    )
    return url


def _fill(url: str) -> int:
    """Publish fillers until the broker refuses one (the queue is over its limit)."""
    with broker(url) as side:
        for published in range(FILLERS):
            try:
                side.publish(b"{}", message_id=f"filler-{published}")
            except pika.exceptions.NackError:
                return published
    raise AssertionError(f"the broker took {FILLERS} fillers: the queue has no limit")


def test_a_refused_back_of_queue_copy_leaves_the_approval_queued(vhost_url: str) -> None:
    outbox = MemoryOutbox()
    handler = WaitingAccount(outbox)
    # one delivery at a time: the fillers stay ready while the approval is with its handler
    runtime = AmqpRuntime(vhost_url, handler, outbox, replace(OPTIONS, prefetch=1))
    running = Running(runtime).start()
    try:
        with broker(vhost_url) as side:
            side.bind_confirmations("observer")
            side.publish(b"{}", message_id=APPROVAL)
            wait_until(lambda: len(handler.approvals()) == 1, "the approval with its handler")
            fillers = _fill(vhost_url)
            handler.go.set()  # its copy is refused: the queue is full
            wait_until(lambda: len(handler.approvals()) == 2, "the approval redelivered", 10.0)
            (confirmed,) = side.take("observer", 1)
            dead = side.take(DEAD_QUEUE, fillers)
    finally:
        handler.go.set()
        exit_code = running.stop()
    assert exit_code == ExitCode.OK
    first, again = handler.approvals()
    assert not first.redelivered
    assert again.redelivered  # the original, handed back, not a copy
    assert confirmed.properties.correlation_id == APPROVAL
    assert all(m.properties.message_id.startswith("filler-") for m in dead)
    assert runtime.stats.requeued_to_back == 0
    assert runtime.stats.requeued == 1
    settled_ready(vhost_url, REQUESTS_QUEUE, 0)
