"""The RabbitMQ topology of the external contract (DESIGN.md), declared idempotently.

``execution.requests`` is a quorum queue with a delivery limit; messages that exceed it (or
that the worker dead-letters itself) go to the fanout exchange ``execution.requests.dlx``,
bound to ``execution.requests.dead``. Confirmations go to the topic exchange
``execution.confirmations`` (``confirmation.<status>.<SYMBOL>``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from worker.errors import WorkerError

REQUESTS_QUEUE = "execution.requests"
DEAD_LETTER_EXCHANGE = "execution.requests.dlx"
DEAD_QUEUE = "execution.requests.dead"
CONFIRMATIONS_EXCHANGE = "execution.confirmations"

PRECONDITION_FAILED = 406
# RabbitMQ: "inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v': received ... but
# current is ..."
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)'")
_VALUES = re.compile(
    r"received (?:the value )?'([^']*)'.*? but current is (?:(?:the value )?'([^']*)'|none)"
)


class TopologyMismatch(WorkerError):
    """An existing queue or exchange was declared with other arguments; one line, safe to print."""


def requests_queue_arguments(delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


def dead_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


def describe_mismatch(reply_text: str) -> str:
    """A one-line explanation of a PRECONDITION_FAILED reply from a declare."""
    text = " ".join(reply_text.split())
    found = _INEQUIVALENT.search(text)
    if found is None:
        return f"the broker refused the topology: {text}"
    argument, kind, name = found.groups()
    values = _VALUES.search(text)
    if values is not None:
        wanted = values.group(1)
        existing = values.group(2) if values.group(2) is not None else "unset"
        difference = f"the worker declares {wanted}, the existing {kind} has {existing}"
    else:
        difference = text
    if argument == "x-delivery-limit":
        advice = "set DELIVERY_LIMIT to the existing value, or delete the queue"
    else:
        advice = f"delete and re-create the {kind} (move its messages first)"
    return f"{kind} {name!r} exists with a different {argument}: {difference}; {advice}"


def declare(channel: Any, delivery_limit: int, on_done: Callable[[], None]) -> None:
    """Declare every exchange, queue and binding on an open pika channel, then ``on_done()``.

    A mismatch closes the channel with 406 PRECONDITION_FAILED; the caller's channel-close
    callback turns it into :class:`TopologyMismatch` with :func:`describe_mismatch`.
    """
    steps: list[Callable[[Callable[[Any], None]], None]] = [
        lambda next_: channel.exchange_declare(
            DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True, callback=next_
        ),
        lambda next_: channel.queue_declare(
            DEAD_QUEUE, durable=True, arguments=dead_queue_arguments(), callback=next_
        ),
        lambda next_: channel.queue_bind(
            DEAD_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#", callback=next_
        ),
        lambda next_: channel.queue_declare(
            REQUESTS_QUEUE,
            durable=True,
            arguments=requests_queue_arguments(delivery_limit),
            callback=next_,
        ),
        lambda next_: channel.exchange_declare(
            CONFIRMATIONS_EXCHANGE, exchange_type="topic", durable=True, callback=next_
        ),
    ]

    def run(index: int) -> None:
        if index == len(steps):
            on_done()
            return
        steps[index](lambda _frame: run(index + 1))

    run(0)
