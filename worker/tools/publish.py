"""``execution-worker publish``: send RPM approvals to ``execution.requests``.

Messages come from a JSON file (one object or a list), JSON lines on stdin, or are generated
(``--samples N``) in the shape of the RPM's ``RPMOutput.to_dict()``. Every message is
persistent, ``mandatory``, carries a ``message_id`` (the decision's ``order_id``, else a hash
of the body, so publishing the same file twice is one execution) and is confirmed by the
broker asynchronously: many in flight, none waited for one by one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TextIO

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from worker.amqp.nodes import connection_parameters
from worker.amqp.publisher import PERSISTENT, ConfirmingPublisher, PublishResult
from worker.amqp.topology import (
    PRECONDITION_FAILED,
    REQUESTS_QUEUE,
    TopologyMismatch,
    declare,
    describe_mismatch,
)
from worker.config import load_settings, mask_url
from worker.errors import ExitCode, WorkerError

MAX_IN_FLIGHT = 1000


class PublishError(WorkerError):
    """The broker could not be reached or refused us; one line, safe to print."""

    def __init__(self, message: str, exit_code: int = ExitCode.BROKER_UNREACHABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class OutgoingMessage:
    body: bytes
    message_id: str | None
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: dict[str, Any] | None = None

    def properties(self) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            headers=self.headers,
            timestamp=int(datetime.now(UTC).timestamp()),
        )


@dataclass
class PublishReport:
    total: int = 0
    results: dict[PublishResult, int] = field(default_factory=dict)
    timed_out: bool = False

    def count(self, result: PublishResult) -> int:
        return self.results.get(result, 0)

    @property
    def confirmed(self) -> int:
        return self.count(PublishResult.CONFIRMED)

    @property
    def done(self) -> int:
        return sum(self.results.values())

    def summary(self) -> str:
        parts = [f"{self.confirmed} of {self.total} confirmed"]
        for result in (PublishResult.RETURNED, PublishResult.NACKED, PublishResult.LOST):
            if self.count(result):
                parts.append(f"{self.count(result)} {result.value}")
        if self.timed_out:
            parts.append(f"{self.total - self.done} unanswered (timeout)")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- samples

# units per approval: FX in base currency, metals in ounces, indices/crypto in contracts
_UNIT_RANGES: dict[str, tuple[float, float, float]] = {
    "XAUUSD": (10.0, 300.0, 1.0),
    "XAGUSD": (500.0, 10_000.0, 50.0),
    "US500": (1.0, 20.0, 0.1),
    "BTCUSD": (0.1, 3.0, 0.01),
}
_FX_RANGE = (10_000.0, 200_000.0, 1_000.0)


def utc_naive_now() -> str:
    """What the RPM writes: ``datetime.utcnow().isoformat()`` (naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None).isoformat()


def approved_trade(symbol: str, direction: int, units: float, **extra: Any) -> dict[str, Any]:
    trade: dict[str, Any] = {
        "symbol": symbol,
        "direction": direction,
        "position_units": units,
        "confidence_score": 0.82,
        "regime": "TRENDING",
        "base_units": units,
        "confidence_adjustment": 0.95,
        "regime_adjustment": 1.0,
        "correlation_adjustment": 1.0,
        "atr": 0.0012,
        "vol_percentile": 0.55,
        "risk_per_trade": 0.01,
        "risk_override": False,
        "timestamp": utc_naive_now(),
        "rpm_version": "1.0.0",
    }
    trade.update(extra)
    return trade


def rpm_output(
    trade: dict[str, Any] | None,
    *,
    status: str = "APPROVED",
    order_id: str | None = None,
    kill_switch: bool = False,
    halted: bool = False,
) -> dict[str, Any]:
    """A whole ``RPMOutput.to_dict()`` around one decision."""
    approved = status in ("APPROVED", "ADJUSTED")
    symbol = trade["symbol"] if trade else "EURUSD"
    return {
        "decision": {
            "status": status,
            "approved_trade": trade if approved else None,
            "rejected_trade": None if approved else {"symbol": symbol, "rejection_reason": "risk"},
            "order_id": order_id,
            "kill_switch_triggered": kill_switch,
            "kill_switch_reason": "daily drawdown limit" if kill_switch else None,
            "portfolio_constraints_passed": True,
            "portfolio_constraint_violations": [],
            "position_sizing_applied": True,
            "sizing_adjustments": {},
            "processing_time_ms": 1.7,
        },
        "portfolio_state": {
            "trading_halted": halted,
            "halt_reason": "daily loss" if halted else None,
            "equity": 100_000.0,
            "open_positions": {},
        },
        "risk_metrics": {"var_95": 0.01},
        "config_hash": "sample",
        "rpm_version": "1.0.0",
        "timestamp": utc_naive_now(),
    }


def sample_units(symbol: str, rng: random.Random) -> float:
    low, high, step = _UNIT_RANGES.get(symbol, _FX_RANGE)
    return round(round(rng.uniform(low, high) / step) * step, 6)


def sample_approvals(count: int, symbols: Sequence[str], seed: int) -> list[dict[str, Any]]:
    """``count`` approvals across ``symbols`` (sides and sizes from ``seed``; fresh ids)."""
    rng = random.Random(seed)
    messages = []
    for i in range(count):
        symbol = symbols[i % len(symbols)]
        trade = approved_trade(symbol, rng.choice((1, -1)), sample_units(symbol, rng))
        messages.append(rpm_output(trade, order_id=uuid.uuid4().hex))
    return messages


# ----------------------------------------------------------------------------- messages


def order_id_of(document: Any) -> str | None:
    decision = document.get("decision", document) if isinstance(document, dict) else None
    order_id = decision.get("order_id") if isinstance(decision, dict) else None
    return order_id if isinstance(order_id, str) and order_id.strip() else None


def with_account(document: Any, account: str) -> Any:
    """The approval with ``decision.account`` = ``account`` unless it names one already
    (docs/OPERATIONS.md 2.8b); both message shapes (RPMOutput, bare decision)."""
    if not isinstance(document, dict):
        return document
    decision = document.get("decision") if isinstance(document.get("decision"), dict) else None
    target = decision if decision is not None else document
    if target.get("account") is None:
        target = {**target, "account": account}
        return {**document, "decision": target} if decision is not None else target
    return document


def outgoing(document: Any, reply_to: str | None = None) -> OutgoingMessage:
    body = json.dumps(document).encode("utf-8")
    order_id = order_id_of(document)
    message_id = order_id or "sha256-" + hashlib.sha256(body).hexdigest()[:32]
    return OutgoingMessage(body, message_id, correlation_id=order_id, reply_to=reply_to)


def read_file(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    return document if isinstance(document, list) else [document]


def read_lines(stream: TextIO) -> list[Any]:
    return [json.loads(line) for line in stream if line.strip()]


# ----------------------------------------------------------------------------- publishing


def publish_messages(
    url: str,
    messages: Sequence[OutgoingMessage],
    *,
    delivery_limit: int,
    exchange: str = "",
    routing_key: str = REQUESTS_QUEUE,
    timeout: float = 60.0,
    on_result: Callable[[OutgoingMessage, PublishResult], None] | None = None,
) -> PublishReport:
    """Declare the topology, publish ``messages`` with asynchronous confirms, report.

    Raises :class:`PublishError` when the broker cannot be reached and
    :class:`TopologyMismatch` when ``execution.requests`` has other arguments.
    """
    report = PublishReport(total=len(messages))
    ioloop = IOLoop()
    pending = iter(messages)
    failure: list[Exception] = []
    holder: dict[str, Any] = {}

    def finish() -> None:
        connection = holder["connection"]
        if connection.is_open:
            connection.close()
        elif connection.is_closed:
            ioloop.stop()

    def publish_more() -> None:
        publisher: ConfirmingPublisher = holder["publisher"]
        while publisher.in_flight < MAX_IN_FLIGHT:
            message = next(pending, None)
            if message is None:
                break
            publisher.publish(
                exchange,
                routing_key,
                message.body,
                message.properties(),
                mandatory=True,
                on_result=partial(settled, message),
            )
        if report.done == report.total:
            finish()

    def settled(message: OutgoingMessage, result: PublishResult) -> None:
        report.results[result] = report.count(result) + 1
        if on_result is not None:
            on_result(message, result)
        if result is not PublishResult.LOST:
            publish_more()

    def on_channel_open(channel: Any) -> None:
        channel.add_on_close_callback(on_channel_closed)
        holder["publisher"] = ConfirmingPublisher(
            channel, on_ready=lambda: declare(channel, delivery_limit, publish_more)
        )

    def on_channel_closed(_channel: Any, reason: BaseException) -> None:
        if (
            isinstance(reason, pika.exceptions.ChannelClosedByBroker)
            and reason.reply_code == PRECONDITION_FAILED
        ):
            failure.append(TopologyMismatch(describe_mismatch(reason.reply_text)))
        elif report.done < report.total and not report.timed_out:
            failure.append(PublishError(f"channel closed: {reason}"))
        finish()

    candidates = connection_parameters(url, shuffle=True)  # a cluster's nodes, in turn

    def on_open_error(_connection: Any, error: BaseException) -> None:
        if candidates and not isinstance(error, pika.exceptions.ProbableAuthenticationError):
            connect()  # the next node of the cluster
            return
        from worker.explain import describe_broker_error

        explained = describe_broker_error(error, url)
        failure.append(PublishError(explained.line, explained.code))
        ioloop.stop()

    def on_timeout() -> None:
        report.timed_out = True
        finish()

    def connect() -> None:
        params = candidates.pop(0)
        params.client_properties = {"connection_name": "execution-worker publish"}
        holder["connection"] = pika.SelectConnection(
            params,
            on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel_open),
            on_open_error_callback=on_open_error,
            on_close_callback=lambda _conn, _reason: ioloop.stop(),
            custom_ioloop=ioloop,
        )

    connect()
    timer = ioloop.call_later(timeout, on_timeout)
    try:
        ioloop.start()
    finally:
        ioloop.remove_timeout(timer)
        ioloop.close()
    if failure:
        raise failure[0]
    return report


def _documents(args: argparse.Namespace, stdin: TextIO) -> Iterable[Any]:
    if args.file:
        return read_file(args.file)
    if args.stdin:
        return read_lines(stdin)
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    return sample_approvals(args.samples, symbols or ["EURUSD"], args.seed)


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    try:
        documents = list(_documents(args, sys.stdin))
    except (OSError, ValueError) as exc:
        print(f"execution-worker publish: cannot read the messages: {exc}", file=sys.stderr)
        return 2
    if args.account:
        documents = [with_account(document, args.account) for document in documents]
    messages = [outgoing(document, args.reply_to) for document in documents]
    url = settings.rabbitmq_url.get_secret_value()
    # PublishError (3 or 77) and TopologyMismatch (78): one line, worker/explain.py
    report = publish_messages(url, messages, delivery_limit=settings.delivery_limit)
    print(f"published to {REQUESTS_QUEUE} at {mask_url(url)}: {report.summary()}")
    return 0 if report.confirmed == report.total else ExitCode.FAILED
