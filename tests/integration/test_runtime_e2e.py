"""End to end: real RabbitMQ + PostgreSQL + the simulated terminal, through ``Service``.

One worker (in this process, one simulated session) serves the module; each test publishes
RPM messages and reads the confirmations from a queue bound to ``execution.confirmations``.
The simulator's market is open around the clock here, slips 2 points on every fill, and
takes 30 s to fill US500 (exchange execution), so every status can be produced on demand.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from schemas.confirmation import ExecutionConfirmation
from schemas.identity import execution_id_for, order_magic_for
from tests.integration.test_amqp_support import (
    Broker,
    Received,
    Running,
    close_connections,
    wait_until,
)
from tests.simbooks import broker_deals
from worker.amqp.runtime import AmqpRuntime, RuntimeOptions
from worker.amqp.topology import DEAD_QUEUE
from worker.config import Settings
from worker.execution.outcome import CONFIRMATION_SCHEMA_HEADER, Delivery, Outcome
from worker.mt5 import api
from worker.service import Service
from worker.tools.publish import approved_trade, rpm_output

SIM_CONFIG = """
[faults]
slippage_points = [[2, 1.0]]

[symbols.EURUSD]
closed_weekly = []
[symbols.GBPUSD]
closed_weekly = []
[symbols.USDJPY]
closed_weekly = []
[symbols.US500]
closed_weekly = []
exchange_fill_delay_seconds = 30.0
"""
POISON_HEADER = "x-test-poison"


@dataclass
class E2E:
    url: str
    database_url: str
    service: Service
    runtime: AmqpRuntime
    side: Broker

    def publish(self, document: dict[str, Any], **kwargs: Any) -> str:
        order_id = document["decision"]["order_id"]
        kwargs.setdefault("message_id", order_id)
        self.side.publish(json.dumps(document).encode(), **kwargs)
        return str(execution_id_for(order_id)) if order_id else ""

    def confirmations(self, ids: list[str], seconds: float = 30.0) -> dict[str, Received]:
        """One confirmation for each id (others, e.g. outbox copies, are skipped)."""
        wanted = list(ids)
        got: dict[str, Received] = {}
        while wanted:
            message = self.side.take("observer", 1, seconds)[0]
            key = message.properties.message_id
            if key in wanted:
                wanted.remove(key)
                got[key] = message
        return got

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def deals(self) -> list[Any]:
        """Every deal of the (only) simulated session, from the broker's books (lagging deals
        too; no query that may answer None)."""
        with self.service.pool.claim(10.0) as lease:
            return broker_deals(lease.session.terminal)


def _poisoned(handler: Callable[[Delivery], Outcome]) -> Callable[[Delivery], Outcome]:
    """The real handler, except that messages marked poison make it raise (a pipeline bug)."""

    def handle(delivery: Delivery) -> Outcome:
        if delivery.properties.headers.get(POISON_HEADER):
            raise RuntimeError("simulated pipeline bug")
        return handler(delivery)

    return handle


def e2e_settings(url: str, database_url: str, directory: Path, sessions: str) -> Settings:
    sim = directory / "sim.toml"
    sim.write_text(SIM_CONFIG)
    sessions_file = directory / "sessions.toml"
    ids = [f"sim-e2e-{i}" for i in range(int(sessions))]
    sessions_file.write_text(
        "".join(f'[[sessions]]\nid = "{i}"\nbackend = "sim"\nsim_config = "{sim}"\n' for i in ids)
    )
    return Settings(
        rabbitmq_url=url,  # type: ignore[arg-type]
        database_url=database_url,  # type: ignore[arg-type]
        mt5_sessions=str(sessions_file),
        metrics_port=0,
        slippage_policy="close",
        slippage_limits_pips={"USDJPY": 0.1},  # 2 points on USDJPY = 0.2 pips: breached
        order_timeout_seconds=1.0,
        reconcile_grace_seconds=0.0,
        delivery_limit=2,
        # 30 approvals go through one session one by one, each waiting for its deal to show
        # on the hardened server (200-600 ms): the last must not expire in the queue
        approval_ttl_seconds=300.0,
    )


@pytest.fixture(scope="module")
def e2e(
    new_vhost: Callable[[], str],
    new_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[E2E]:
    url, database_url = new_vhost(), new_database()
    settings = e2e_settings(url, database_url, tmp_path_factory.mktemp("e2e"), "1")
    service = Service.start(settings)
    options = RuntimeOptions(
        prefetch=service.sessions,
        delivery_limit=settings.delivery_limit,
        requeue_delay_seconds=0.1,
        sweep_interval_seconds=1.0,
        reconnect_min_delay_seconds=0.1,
        reconnect_max_delay_seconds=1.0,
    )
    runtime = AmqpRuntime(url, _poisoned(service.handler), service.outbox, options)
    running = Running(runtime).start()
    side = Broker(url)
    side.bind_confirmations("observer")
    try:
        yield E2E(url, database_url, service, runtime, side)
    finally:
        side.close()
        running.stop()
        service.close()


def _reconnect_side(e2e: E2E) -> None:
    e2e.side.close()
    e2e.side = Broker(e2e.url)


def approval(symbol: str, direction: int, units: float, **kwargs: Any) -> dict[str, Any]:
    return rpm_output(approved_trade(symbol, direction, units), order_id=uuid.uuid4().hex, **kwargs)


def test_no_result_is_answered_provisionally_and_never_sent_again(e2e: E2E) -> None:
    with e2e.service.pool.claim(5.0) as lease:
        lease.session.terminal.set_faults(scripted=("no_result", "ok"))
    key = e2e.publish(approval("EURUSD", 1, 10_000.0))
    body = json.loads(e2e.confirmations([key])[key].body)
    assert (body["status"], body["rejection_reason"]) == ("FAILED", "UNKNOWN_OUTCOME")
    assert body["provisional"] is True
    sends = e2e.query(
        "SELECT count(*) FROM execution.execution_events"
        " WHERE execution_id = %s AND function = 'order_send'",
        uuid.UUID(key),
    )
    assert sends == [(1,)]  # no second order_send
    with e2e.service.pool.claim(5.0) as lease:  # the "ok" left unused for the next tests
        lease.session.terminal.set_faults(scripted=())


def test_every_status_round_trips(e2e: E2E) -> None:
    with e2e.service.pool.claim(5.0) as lease:
        # instant execution fills FOK only on a real server: partial fills need market
        lease.session.terminal.update_symbol(
            "GBPUSD", trade_exemode=api.SYMBOL_TRADE_EXECUTION_MARKET
        )
    cases = {
        "FILLED": approval("EURUSD", 1, 20_000.0),
        "PARTIALLY_FILLED": approval("GBPUSD", 1, 3_200_000.0),  # beyond 30 lots liquidity
        "REJECTED": approval("EURUSD", -1, 20_000.0, kill_switch=True),
        "EXPIRED": approval("US500", 1, 2.0),  # never fills within order_timeout
        "CANCELLED": approval("USDJPY", -1, 20_000.0),  # slippage breach, closed at once
    }
    keys = {status: e2e.publish(document) for status, document in cases.items()}
    got = e2e.confirmations(list(keys.values()))
    for status, key in keys.items():
        message = got[key]
        confirmation = ExecutionConfirmation.model_validate_json(message.body)
        symbol = cases[status]["decision"]["approved_trade"]["symbol"]
        assert confirmation.status == status, confirmation
        assert message.routing_key == f"confirmation.{status.lower()}.{symbol}"
        assert message.properties.message_id == str(confirmation.execution_id) == key
        assert message.properties.correlation_id == cases[status]["decision"]["order_id"]
        assert message.properties.headers == {"schema": CONFIRMATION_SCHEMA_HEADER}
        assert message.properties.delivery_mode == 2
        rows = e2e.query(
            "SELECT state FROM execution.executions WHERE execution_id = %s", uuid.UUID(key)
        )
        assert rows == [(status,)]
    wait_until(
        lambda: (
            e2e.query(
                "SELECT count(*) FROM execution.outbox WHERE published_at IS NULL "
                "AND execution_id = ANY(%s)",
                [uuid.UUID(k) for k in keys.values()],
            )
            == [(0,)]
        ),
        "the outbox rows to be marked published",
    )


def test_the_request_is_acked_only_after_the_final_commit(e2e: E2E) -> None:
    acked_before = e2e.runtime.stats.acked
    with psycopg.connect(e2e.database_url) as blocker:
        # holds the final transaction (row + outbox) back until we roll back
        blocker.execute("LOCK TABLE execution.outbox IN ACCESS EXCLUSIVE MODE")
        key = e2e.publish(approval("EURUSD", 1, 30_000.0))
        wait_until(
            lambda: (
                e2e.query(
                    "SELECT state FROM execution.executions WHERE execution_id = %s", uuid.UUID(key)
                )
                in ([("SUBMITTING",)], [("SUBMITTED",)])
            ),
            "the intent row",
        )
        # none for this key (an earlier test's byte-identical outbox copy may still arrive)
        assert key not in {m.properties.message_id for m in e2e.side.drain("observer")}
        assert e2e.runtime.stats.acked == acked_before
        blocker.rollback()
    e2e.confirmations([key])
    wait_until(lambda: e2e.runtime.stats.acked == acked_before + 1, "the ack")
    assert e2e.query(
        "SELECT state FROM execution.executions WHERE execution_id = %s", uuid.UUID(key)
    ) == [("FILLED",)]


def assert_executed_once(e2e: E2E, deals: list[Any], key: str) -> None:
    """The broker's deals for this execution add up to what it executed, once (a hedging
    account may close an opposite position first, so one execution can be several deals)."""
    magic = order_magic_for(uuid.UUID(key), e2e.service.settings.magic)  # comments are cut
    lots = sum(d.volume for d in deals if d.magic == magic)
    [(executed,)] = e2e.query(
        "SELECT executed_lots FROM execution.executions WHERE execution_id = %s", uuid.UUID(key)
    )
    assert executed > 0
    assert lots == pytest.approx(executed), f"{key}: deals {lots} lots, executed {executed}"


def test_a_duplicate_delivery_is_one_order_and_the_same_confirmation(e2e: E2E) -> None:
    document = approval("EURUSD", 1, 40_000.0)
    e2e.side.publish(json.dumps(document).encode(), message_id=document["decision"]["order_id"])
    key = e2e.publish(document)  # at the same time as the first
    first = e2e.confirmations([key])[key]
    second = e2e.confirmations([key])[key]
    key_again = e2e.publish(document)  # long after
    third = e2e.confirmations([key_again])[key_again]
    assert first.body == second.body == third.body
    assert_executed_once(e2e, e2e.deals(), key)
    assert e2e.query(
        "SELECT count(*) FROM execution.executions WHERE idempotency_key = %s",
        document["decision"]["order_id"],
    ) == [(1,)]


def test_reply_to_gets_the_same_confirmation(e2e: E2E) -> None:
    e2e.side.declare_queue("rpm.replies.e2e")
    key = e2e.publish(approval("EURUSD", -1, 15_000.0), reply_to="rpm.replies.e2e")
    published = e2e.confirmations([key])[key]
    reply = e2e.side.take("rpm.replies.e2e", 1)[0]
    assert reply.body == published.body
    assert reply.properties.message_id == key


def test_keyless_and_poison_messages_are_dead_lettered(e2e: E2E) -> None:
    keyless = approval("EURUSD", 1, 10_000.0)
    keyless["decision"]["order_id"] = None
    e2e.side.publish(json.dumps(keyless).encode(), message_id=None)
    dead = e2e.side.take(DEAD_QUEUE, 1)[0]
    assert dead.properties.headers["x-rejection-reason"]
    assert json.loads(dead.body) == keyless
    errors_before = e2e.runtime.stats.handler_errors
    poison = approval("EURUSD", 1, 10_000.0)
    e2e.publish(poison, headers={POISON_HEADER: True})
    dead = e2e.side.take(DEAD_QUEUE, 1)[0]
    assert dead.properties.message_id == poison["decision"]["order_id"]
    assert e2e.runtime.stats.handler_errors - errors_before == 3  # 1 + delivery limit 2
    # the worker carries on
    key = e2e.publish(approval("EURUSD", 1, 10_000.0))
    e2e.confirmations([key])


def test_broker_loss_mid_stream_confirms_everything_once(e2e: E2E) -> None:
    documents = [approval("EURUSD", 1 if i % 2 else -1, 10_000.0 + i) for i in range(30)]
    keys = [e2e.publish(document) for document in documents]
    wait_until(lambda: len(e2e.side.drain("observer")) >= 1 or False, "first confirmations")
    connections_before = e2e.runtime.stats.connections
    close_connections(e2e.url)
    wait_until(lambda: e2e.runtime.stats.connections > connections_before, "a reconnect")
    _reconnect_side(e2e)
    seen: set[str] = set()

    def all_filled() -> bool:
        rows = e2e.query(
            "SELECT count(*) FROM execution.executions WHERE state = 'FILLED' "
            "AND execution_id = ANY(%s)",
            [uuid.UUID(k) for k in keys],
        )
        return rows == [(30,)]

    try:
        wait_until(all_filled, "30 filled executions")
    except AssertionError:
        states = e2e.query(
            "SELECT state, rejection_reason, count(*) FROM execution.executions"
            " WHERE execution_id = ANY(%s) GROUP BY 1, 2",
            [uuid.UUID(k) for k in keys],
        )
        raise AssertionError(f"not all filled: {states}") from None

    def all_confirmed() -> bool:
        seen.update(m.properties.message_id for m in e2e.side.drain("observer"))
        unpublished = e2e.query(
            "SELECT count(*) FROM execution.outbox WHERE published_at IS NULL "
            "AND execution_id = ANY(%s)",
            [uuid.UUID(k) for k in keys],
        )
        return unpublished == [(0,)]

    wait_until(all_confirmed, "every confirmation published")
    deals = e2e.deals()
    for key in keys:
        assert_executed_once(e2e, deals, key)
