"""10 000+ hostile messages through the REAL worker on the REAL broker: no order, none lost.

The worker (``Service`` + ``AmqpRuntime``, in this process, two simulated sessions) consumes
its own vhost and database. Every message carries a fuzz id, in ``correlation_id`` (a
REJECTED confirmation repeats it) and in a header (a dead letter keeps the request's
headers), so each one is accounted for exactly once:

- the runtime never requeued, its handler never raised, it still consumes at the end;
- NO order reached the terminal (every simulated session's deal and order history is empty);
- every message is either one REJECTED confirmation or one dead letter with a genuine
  ``x-rejection-reason`` (a forged incoming header is replaced), and where the catalogue
  says which, it is that one;
- then one valid approval is FILLED: the worker was neither stalled nor blind.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pytest

from schemas.confirmation import ExecutionConfirmation
from tests.integration.test_amqp_support import Running, ready_count, wait_until
from tests.security.hostile import Hostile, hostile_messages
from worker.amqp.runtime import REJECTION_REASON_HEADER, AmqpRuntime, RuntimeOptions
from worker.amqp.topology import CONFIRMATIONS_EXCHANGE, DEAD_QUEUE, REQUESTS_QUEUE
from worker.config import Settings
from worker.service import Service
from worker.tools.publish import approved_trade, rpm_output

SEED = 20261125
COUNT = 10_000
TEN_MB_BODIES = 3
OBSERVER = "fuzz.observer"
FUZZ_HEADER = "x-fuzz-id"
SIM_CONFIG = """
[symbols.EURUSD]
closed_weekly = []
[symbols.GBPUSD]
closed_weekly = []
[symbols.XAUUSD]
closed_weekly = []
"""
# the parser's codes (schemas.request) and the pipeline's own dead-letter reasons
KNOWN_REASONS = {
    "body_too_large",
    "unsupported_content_type",
    "unsupported_encoding",
    "empty_body",
    "not_utf8",
    "too_deep",
    "too_many_elements",
    "parse_timeout",
    "not_json",
    "not_an_object",
    "unknown_shape",
    "missing_idempotency_key",
    "unparseable",
}


def fuzz_settings(url: str, database_url: str, directory: Path) -> Settings:
    sim = directory / "sim.toml"
    sim.write_text(SIM_CONFIG)
    sessions = directory / "sessions.toml"
    sessions.write_text(
        "".join(
            f'[[sessions]]\nid = "sim-fuzz-{i}"\nbackend = "sim"\nsim_config = "{sim}"\n'
            for i in range(2)
        )
    )
    return Settings(
        rabbitmq_url=url,  # type: ignore[arg-type]
        database_url=database_url,  # type: ignore[arg-type]
        mt5_sessions=str(sessions),
        metrics_port=0,
        volume_over_max="reject",  # above volume_max is refused, never split
        reconcile_grace_seconds=0.0,
        prefetch=8,
        db_pool_size=12,
    )


@pytest.fixture(scope="module")
def worker(
    new_vhost: Callable[[], str],
    new_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Service, Running]]:
    url, database_url = new_vhost(), new_database()
    settings = fuzz_settings(url, database_url, tmp_path_factory.mktemp("fuzz"))
    service = Service.start(settings)
    options = RuntimeOptions(
        prefetch=8,
        delivery_limit=settings.delivery_limit,
        requeue_delay_seconds=0.1,
        sweep_interval_seconds=2.0,
        reconnect_min_delay_seconds=0.1,
        reconnect_max_delay_seconds=1.0,
    )
    running = Running(AmqpRuntime(url, service.handler, service.outbox, options)).start()
    try:
        yield url, service, running
    finally:
        running.stop(60.0)
        service.close()


def _properties(message: Hostile, fuzz_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=2,
        message_id=message.message_id,
        correlation_id=fuzz_id,
        headers={**message.headers, FUZZ_HEADER: fuzz_id},
    )


def _publish_all(url: str, messages: list[Hostile]) -> dict[str, Hostile]:
    """Publish with publisher confirms, in transactions of 500 (one round trip per batch)."""
    sent: dict[str, Hostile] = {}
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.tx_select()
        for index, message in enumerate(messages):
            fuzz_id = f"fz-{index}"
            channel.basic_publish(
                "", REQUESTS_QUEUE, message.body, _properties(message, fuzz_id), mandatory=True
            )
            sent[fuzz_id] = message
            if index % 500 == 499:
                channel.tx_commit()
        channel.tx_commit()
    finally:
        connection.close()
    return sent


def _drain(url: str, queue: str) -> list[tuple[Any, bytes]]:
    got: list[tuple[Any, bytes]] = []
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=500)
        for method, properties, body in channel.consume(queue, inactivity_timeout=1.0):
            if method is None:
                break
            got.append((properties, body))
            channel.basic_ack(method.delivery_tag)
        channel.cancel()
    finally:
        connection.close()
    return got


def _history(service: Service) -> tuple[int, int]:
    deals = orders = 0
    for index in range(2):  # each session once (claims without an id may repeat one)
        with service.pool.claim(10.0, session_id=f"sim-fuzz-{index}") as lease:
            assert lease.session.id == f"sim-fuzz-{index}"
            terminal = lease.session.terminal
            deals += len(
                terminal.history_deals_get(datetime(2000, 1, 1), datetime(2100, 1, 1)) or ()
            )
            orders += len(
                terminal.history_orders_get(datetime(2000, 1, 1), datetime(2100, 1, 1)) or ()
            )
            orders += len(terminal.orders_get() or ())
    return deals, orders


def test_hostile_messages_never_become_orders_and_none_is_lost(
    worker: tuple[str, Service, Running],
) -> None:
    url, service, running = worker
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.queue_declare(OBSERVER, durable=True)
        channel.queue_bind(OBSERVER, CONFIRMATIONS_EXCHANGE, "confirmation.#")

    messages = hostile_messages(COUNT + TEN_MB_BODIES, SEED, ten_mb=TEN_MB_BODIES)
    started = time.monotonic()
    sent = _publish_all(url, messages)
    wait_until(
        lambda: ready_count(url, OBSERVER) + ready_count(url, DEAD_QUEUE) >= len(sent),
        "every hostile message to be answered",
        seconds=300.0,
    )
    elapsed = time.monotonic() - started
    wait_until(lambda: ready_count(url, REQUESTS_QUEUE) == 0, "the request queue to empty")

    stats = running.runtime.stats
    assert running.runtime.consuming.is_set(), "the worker stopped consuming"
    assert (stats.requeued, stats.handler_errors) == (0, 0)
    assert _history(service) == (0, 0), "an order reached the terminal"

    confirmations = _drain(url, OBSERVER)
    dead = _drain(url, DEAD_QUEUE)
    ended: Counter[str] = Counter()
    by_execution: dict[str, str] = {}
    for properties, body in confirmations:
        confirmation = ExecutionConfirmation.model_validate_json(body)
        fuzz_id = properties.correlation_id
        assert confirmation.status == "REJECTED", (sent[fuzz_id].kind, confirmation)
        assert confirmation.executed_units in (None, 0, 0.0)
        if by_execution.setdefault(properties.message_id, fuzz_id) != fuzz_id:
            raise AssertionError(f"two messages share execution {properties.message_id}")
        if fuzz_id in ended:
            continue  # an outbox re-publication: same message_id, same bytes
        ended[fuzz_id] = 1
        assert sent[fuzz_id].expect in ("confirm", "either"), sent[fuzz_id].kind
    reasons: Counter[str] = Counter()
    for properties, _body in dead:
        fuzz_id = properties.headers[FUZZ_HEADER]
        reason = properties.headers[REJECTION_REASON_HEADER]
        assert reason in KNOWN_REASONS, reason  # never the forged incoming header
        reasons[reason] += 1
        assert fuzz_id not in ended, f"{fuzz_id} both confirmed and dead-lettered"
        ended[fuzz_id] = 1
        assert sent[fuzz_id].expect in ("dead", "either"), sent[fuzz_id].kind
    assert set(ended) == set(sent), f"lost: {sorted(set(sent) - set(ended))[:10]}"
    assert sum(ended.values()) == len(sent) == COUNT + TEN_MB_BODIES
    print(
        f"\nfuzz: {len(sent)} hostile messages in {elapsed:.1f} s "
        f"({len(sent) / elapsed:.0f} msg/s): {len(by_execution)} REJECTED confirmations, "
        f"{len(dead)} dead letters {dict(reasons)}"
    )

    # the worker is alive and would have traded: one valid approval fills
    order_id = uuid.uuid4().hex
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        document = rpm_output(approved_trade("EURUSD", 1, 10_000.0), order_id=order_id)
        channel.basic_publish(
            "",
            REQUESTS_QUEUE,
            json.dumps(document).encode(),
            pika.BasicProperties(content_type="application/json", message_id=order_id),
        )
    wait_until(lambda: ready_count(url, OBSERVER) == 1, "the valid approval's confirmation")
    (properties, body), *_ = _drain(url, OBSERVER)
    assert ExecutionConfirmation.model_validate_json(body).status == "FILLED"
    assert _history(service)[0] == 1
