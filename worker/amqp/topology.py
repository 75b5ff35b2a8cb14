"""The RabbitMQ topology of the external contract (docs/CONTRACT.md), declared idempotently.

``execution.requests`` is a quorum queue with a delivery limit; messages that exceed it (or
that the worker dead-letters itself) go to the fanout exchange ``execution.requests.dlx``,
bound to ``execution.requests.dead``. Confirmations go to the topic exchange
``execution.confirmations`` (``confirmation.<status>.<SYMBOL>``), whose alternate exchange
``execution.confirmations.ae`` (fanout) takes every confirmation no binding wants into the
quorum queue ``execution.confirmations.unrouted``: a confirmation nobody is bound for never
stalls the worker.

The alternate exchange is given by a POLICY (:func:`policy_command`), not by an argument of
the exchange: exchange arguments are fixed at creation (an existing exchange cannot be
declared again with one: 406 PRECONDITION_FAILED), and every client that declares
``execution.confirmations`` plainly, as downstream consumers do, would be refused once it had
one. Without the policy nothing stalls either: a confirmation the broker returns (mandatory,
nothing bound) is moved to the same queue by the worker (:mod:`worker.amqp.outbox`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from worker.errors import WorkerError

REQUESTS_QUEUE = "execution.requests"
DEAD_LETTER_EXCHANGE = "execution.requests.dlx"
DEAD_QUEUE = "execution.requests.dead"
CONFIRMATIONS_EXCHANGE = "execution.confirmations"
UNROUTED_EXCHANGE = "execution.confirmations.ae"
UNROUTED_QUEUE = "execution.confirmations.unrouted"
ALTERNATE_EXCHANGE_KEY = "alternate-exchange"
POLICY_NAME = "execution-confirmations-ae"
POLICY_PATTERN = r"^execution\.confirmations$"

PRECONDITION_FAILED = 406
# RabbitMQ: "inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v': received ... but
# current is ..."
_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for (queue|exchange) '([^']+)'")
_VALUES = re.compile(
    r"received (?:the value )?'([^']*)'.*? but current is (?:(?:the value )?'([^']*)'|none)"
)


class TopologyMismatch(WorkerError):
    """An existing queue or exchange was declared with other arguments; one line, safe to print."""

    exit_code = 78  # ExitCode.TOPOLOGY_MISMATCH


def requests_queue_arguments(delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


def dead_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


def unrouted_queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "quorum"}


def alternate_exchange_policy() -> dict[str, str]:
    """The policy definition that gives ``execution.confirmations`` its alternate exchange."""
    return {ALTERNATE_EXCHANGE_KEY: UNROUTED_EXCHANGE}


def policy_command(vhost: str = "VHOST") -> str:
    """The rabbitmqctl command that gives an existing ``execution.confirmations`` its
    alternate exchange (a policy; the argument cannot be added to an existing exchange)."""
    definition = json.dumps(alternate_exchange_policy(), separators=(",", ":"))
    return (
        f"rabbitmqctl set_policy -p {vhost} --apply-to exchanges {POLICY_NAME}"
        f" '{POLICY_PATTERN}' '{definition}'"
    )


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
            UNROUTED_EXCHANGE, exchange_type="fanout", durable=True, callback=next_
        ),
        lambda next_: channel.queue_declare(
            UNROUTED_QUEUE, durable=True, arguments=unrouted_queue_arguments(), callback=next_
        ),
        lambda next_: channel.queue_bind(
            UNROUTED_QUEUE, UNROUTED_EXCHANGE, routing_key="#", callback=next_
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
