"""``execution-worker demo``: the whole path on the simulated terminal, in one command.

Runs in a RabbitMQ vhost and a PostgreSQL database of its own (created now, dropped at the
end: :mod:`worker.tools.isolation`) on the broker and server of ``RABBITMQ_URL`` and
``DATABASE_URL``, so that it never consumes another worker's ``execution.requests`` nor
writes into its audit store; ``--vhost-url`` names an empty vhost reserved for it instead,
``--in-place`` uses the vhost and database of the URLs as they are.

Migrates the database, starts a worker in this process (simulated MT5 sessions), binds a
private queue to ``execution.confirmations`` (and one to the dead-letter exchange), publishes
a mixed batch, prints each confirmation as it arrives and exits 0 once every expected answer
arrived, or 1 with what is missing after ``--timeout`` seconds.

The batch: buys and sells on several symbols (USDJPY and XAUUSD included), one kill-switch
decision, one invalid approval that carries a key (a REJECTED confirmation), one with no key
at all (dead-lettered), one order beyond the simulator's liquidity (a partial fill) and a
second delivery of one approval (the same confirmation again, no second order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
from pydantic import SecretStr

from schemas.identity import execution_id_for
from worker.amqp.nodes import connection_parameters
from worker.amqp.runtime import AmqpRuntime, runtime_from_settings
from worker.amqp.topology import CONFIRMATIONS_EXCHANGE, DEAD_LETTER_EXCHANGE
from worker.config import Settings, load_settings, mask_url
from worker.errors import ExitCode
from worker.explain import describe_broker_error, explain
from worker.mt5 import api
from worker.mt5.sim.config import default_symbols
from worker.tools.isolation import own_database, own_vhost, vhost_of
from worker.tools.publish import (
    OutgoingMessage,
    PublishError,
    approved_trade,
    outgoing,
    publish_messages,
    rpm_output,
    sample_units,
)

DEMO_SESSIONS = "2"  # when MT5_SESSIONS is a file (of real sessions)
RUN_HEADER = "x-demo-run"
SYMBOLS = ("EURUSD", "USDJPY", "XAUUSD", "GBPUSD")
# GBPUSD is IOC-only in the simulator (market execution in the demo, see demo_settings)
# and fills at most 30 lots per order;
# 40 lots against 30 lots of liquidity per order: a partial fill even after the hedging
# account first closes an opposite GBPUSD position left by the ordinary trades
PARTIAL_SYMBOL, PARTIAL_UNITS = "GBPUSD", 4_000_000.0
COLUMNS = (
    ("status", 17),
    ("symbol", 7),
    ("side", 4),
    ("units", 11),
    ("lots", 6),
    ("fill price", 11),
    ("slip pips", 9),
    ("latency", 9),
    ("note", 0),
)


@dataclass
class Plan:
    """What the demo publishes and what it waits for."""

    messages: list[OutgoingMessage] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)  # confirmation message_id -> copies
    labels: dict[str, str] = field(default_factory=dict)
    dead_letters: int = 0


def build_plan(count: int, run_id: str) -> Plan:
    """``count`` messages (at least 6): the special cases plus ordinary buys and sells."""
    plan = Plan()

    def add(document: dict[str, Any], label: str) -> OutgoingMessage:
        message = outgoing(document)
        plan.messages.append(message)
        assert message.message_id is not None
        key = str(execution_id_for(message.message_id))
        plan.expected[key] = plan.expected.get(key, 0) + 1
        plan.labels.setdefault(key, label)
        return message

    ordinary = max(1, count - 5)
    first: OutgoingMessage | None = None
    for i in range(ordinary):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        units = sample_units(symbol, _rng(run_id, i))
        trade = approved_trade(symbol, 1 if i % 2 == 0 else -1, units)
        message = add(rpm_output(trade, order_id=f"demo-{run_id}-{i}"), "")
        first = first or message
    partial = approved_trade(PARTIAL_SYMBOL, 1, PARTIAL_UNITS)
    add(rpm_output(partial, order_id=f"demo-{run_id}-partial"), "beyond liquidity")
    killed = approved_trade("EURUSD", 1, 50_000.0)
    add(rpm_output(killed, order_id=f"demo-{run_id}-kill", kill_switch=True), "kill switch")
    invalid = approved_trade("USDJPY", -1, -5_000.0)  # negative units: invalid, but keyed
    add(rpm_output(invalid, order_id=f"demo-{run_id}-invalid"), "invalid, with a key")
    # no order_id and no message_id: cannot be executed safely -> dead letter
    keyless = rpm_output(approved_trade("EURUSD", 1, 10_000.0), order_id=None)
    plan.messages.append(
        OutgoingMessage(json.dumps(keyless).encode(), None, headers={RUN_HEADER: run_id})
    )
    plan.dead_letters = 1
    # the same approval delivered twice: one order, the same confirmation twice
    assert first is not None and first.message_id is not None
    plan.messages.append(first)
    duplicate = str(execution_id_for(first.message_id))
    plan.expected[duplicate] += 1
    return plan


def _rng(run_id: str, index: int) -> Any:
    import random

    return random.Random(f"{run_id}-{index}")


# ----------------------------------------------------------------------------- table


def header() -> str:
    line = "  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()
    return f"{line}\n{'-' * len(line)}"


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _price(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return _number(value, 5 if value < 10 else 3 if value < 1000 else 2)


def row(confirmation: dict[str, Any], note: str) -> str:
    """One confirmation as a table row."""
    direction = confirmation.get("direction")
    side = {1: "BUY", -1: "SELL"}.get(direction, "-") if isinstance(direction, int) else "-"
    latency = "-"
    try:
        received = datetime.fromisoformat(confirmation["received_at"])
        completed = datetime.fromisoformat(confirmation["completed_at"])
        latency = f"{(completed - received).total_seconds() * 1000:.0f} ms"
    except (KeyError, TypeError, ValueError):
        pass
    reason = confirmation.get("rejection_reason")
    notes = [n for n in (reason, note) if n]
    cells = (
        str(confirmation.get("status", "?")),
        str(confirmation.get("symbol") or "-"),
        side,
        _number(confirmation.get("executed_units"), 0),
        _number(confirmation.get("executed_lots"), 2),
        _price(confirmation.get("fill_price")),
        _number(confirmation.get("slippage_pips"), 2),
        latency,
        "; ".join(notes),
    )
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()


# ----------------------------------------------------------------------------- observer


class Observer:
    """Private queues on the confirmation exchange and the dead-letter exchange."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(connection_parameters(url, shuffle=True))
        self.channel = self.connection.channel()
        self.confirmations = self._bind(CONFIRMATIONS_EXCHANGE, "confirmation.#")
        self.dead = self._bind(DEAD_LETTER_EXCHANGE, "#")

    def _bind(self, exchange: str, pattern: str) -> str:
        declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        name: str = declared.method.queue
        self.channel.queue_bind(name, exchange, pattern)
        return name

    def poll(self, queue: str) -> tuple[Any, bytes] | None:
        method, properties, body = self.channel.basic_get(queue, auto_ack=True)
        return None if method is None else (properties, body)

    def sleep(self, seconds: float) -> None:
        self.connection.sleep(seconds)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def watch(
    observer: Observer,
    plan: Plan,
    run_id: str,
    deadline: float,
    out: Callable[[str], None],
) -> list[str]:
    """Print arrivals until everything expected came; return what is still missing."""
    remaining = dict(plan.expected)
    dead_left = plan.dead_letters
    seen: set[str] = set()
    while remaining or dead_left:
        if time.monotonic() > deadline:
            break
        got_any = False
        if (message := observer.poll(observer.confirmations)) is not None:
            got_any = True
            properties, body = message
            key = properties.message_id
            if key in remaining:
                note = plan.labels.get(key, "")
                if key in seen:
                    note = "second delivery: same confirmation"
                seen.add(key)
                remaining[key] -= 1
                if remaining[key] == 0:
                    del remaining[key]
                out(row(json.loads(body), note))
        if (message := observer.poll(observer.dead)) is not None:
            got_any = True
            properties, _body = message
            headers = properties.headers or {}
            if headers.get(RUN_HEADER) == run_id:
                dead_left -= 1
                reason = headers.get("x-rejection-reason", "?")
                out(f"{'DEAD-LETTERED':17}  {'-':7}  {'-':4}  no key: {reason}")
        if not got_any:
            observer.sleep(0.05)
    missing = [f"{plan.labels.get(k) or k}: {n} confirmation(s)" for k, n in remaining.items()]
    if dead_left:
        missing.append(f"{dead_left} dead letter(s)")
    return missing


# ----------------------------------------------------------------------------- main


def demo_settings(settings: Settings, directory: str) -> Settings:
    """Simulated sessions whatever MT5_BACKEND says (MT5_SESSIONS of them if it is a count),
    with the simulated market open around the clock so that the demo fills on weekends too."""
    count = int(settings.mt5_sessions) if settings.mt5_sessions.isdigit() else int(DEMO_SESSIONS)
    sim = Path(directory) / "sim.toml"
    tables = {name: "closed_weekly = []\n" for name in default_symbols()}
    # the (hardened) simulator fills instant-execution symbols FOK only, as real servers do:
    # GBPUSD runs under market execution here, so its IOC bitmask applies and 40 lots fill 30
    tables[PARTIAL_SYMBOL] += f"trade_exemode = {api.SYMBOL_TRADE_EXECUTION_MARKET}\n"
    sim.write_text("".join(f"[symbols.{name}]\n{table}" for name, table in tables.items()))
    sessions = Path(directory) / "sessions.toml"
    sessions.write_text(
        "".join(
            f'[[sessions]]\nid = "demo-{i}"\nbackend = "sim"\nsim_config = "{sim}"\n'
            for i in range(max(1, count))
        )
    )
    return settings.model_copy(update={"mt5_backend": "sim", "mt5_sessions": str(sessions)})


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    with contextlib.ExitStack() as stack:
        if not args.in_place:
            settings = _isolated(settings, args.vhost_url, stack)
        else:
            print(
                "demo: --in-place: consumes execution.requests of"
                f" {mask_url(settings.rabbitmq_url.get_secret_value())} and writes to"
                f" {mask_url(settings.database_url.get_secret_value())}"
            )
        directory = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="execution-worker-demo-")
        )
        return _demo(demo_settings(settings, directory), args)


def _isolated(settings: Settings, vhost_url: str | None, stack: contextlib.ExitStack) -> Settings:
    """The settings pointed at a vhost and a database of the demo's own (dropped by
    ``stack``), after saying so."""
    amqp = settings.rabbitmq_url.get_secret_value()
    database = settings.database_url.get_secret_value()
    if vhost_url:
        own_amqp, made = vhost_url, "given by --vhost-url"
    else:
        own_amqp, made = stack.enter_context(own_vhost(amqp, "ew_demo")), "created now"
    own_db = stack.enter_context(own_database(database, "ew_demo"))
    print(
        f"demo: runs in vhost {vhost_of(own_amqp)!r} ({made}) and database"
        f" {own_db.rsplit('/', 1)[-1]!r} (created now), removed at the end"
        f"{' (the database)' if vhost_url else ''}; execution.requests of vhost"
        f" {vhost_of(amqp)!r} is not touched"
    )
    return settings.model_copy(
        update={"rabbitmq_url": SecretStr(own_amqp), "database_url": SecretStr(own_db)}
    )


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from worker.observability.logs import configure_logging, register_settings_secrets
    from worker.service import Service

    register_settings_secrets(settings)
    configure_logging("console", "WARNING")
    url = settings.rabbitmq_url.get_secret_value()
    count = max(6, args.count)
    print(f"demo: database {mask_url(settings.database_url.get_secret_value())}")
    print(f"demo: broker   {mask_url(url)}")
    try:
        service = Service.start(settings)
    except Exception as exc:
        explained = explain(exc)
        print(f"execution-worker demo: cannot start the worker: {explained.line}", file=sys.stderr)
        return explained.code
    runtime = runtime_from_settings(settings, service.handler, service.outbox, service.sessions)
    ended: list[int] = []
    thread = threading.Thread(
        target=lambda: ended.append(runtime.run()), name="amqp-io", daemon=True
    )
    thread.start()
    observer: Observer | None = None
    try:
        if not _wait_consuming(runtime, args.timeout):
            reason = runtime.error or f"the worker did not start consuming at {mask_url(url)}"
            print(f"execution-worker demo: {reason}", file=sys.stderr)
            thread.join(5.0)
            code = ended[0] if ended else ExitCode.BROKER_UNREACHABLE
            return code if code != ExitCode.OK else ExitCode.BROKER_UNREACHABLE
        observer = Observer(url)
        run_id = uuid.uuid4().hex[:8]
        plan = build_plan(count, run_id)
        print(
            f"demo: worker up ({service.sessions} simulated session(s)); "
            f"publishing {len(plan.messages)} messages (run {run_id})\n"
        )
        print(header())
        publish_messages(url, plan.messages, delivery_limit=settings.delivery_limit)
        deadline = time.monotonic() + args.timeout
        missing = watch(observer, plan, run_id, deadline, lambda line: print(line, flush=True))
        if missing:
            print(
                f"\nexecution-worker demo: timed out after {args.timeout:.0f} s; missing: "
                + ", ".join(missing),
                file=sys.stderr,
            )
            return ExitCode.FAILED
        print(f"\ndemo: all {len(plan.messages)} messages answered")
        return 0
    except PublishError as exc:
        print(f"execution-worker demo: {exc}", file=sys.stderr)
        return exc.exit_code
    except pika.exceptions.AMQPError as exc:
        explained = describe_broker_error(exc, url)
        print(f"execution-worker demo: {explained.line}", file=sys.stderr)
        return explained.code
    finally:
        if observer is not None:
            observer.close()
        runtime.stop()
        thread.join(settings.drain_timeout_seconds + 5)
        service.close()


def _wait_consuming(runtime: AmqpRuntime, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runtime.consuming.wait(0.1):
            return True
        if runtime.error:
            return False
    return False
