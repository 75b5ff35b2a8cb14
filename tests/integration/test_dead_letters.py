"""``execution-worker dead-letters`` on the real RabbitMQ and PostgreSQL, against a real worker.

One worker (``Service`` + ``AmqpRuntime``, one simulated session) serves the module with a
delivery limit of 1. An *outage* switch makes its handler fail (as a terminal that cannot be
reached would), so an approval published during the outage is redelivered, then
dead-lettered by the broker (``delivery_limit``). The operator's commands run as the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from schemas.identity import execution_id_for, order_magic_for
from tests.integration.test_amqp_support import Broker, Received, Running, ready_count, wait_until
from tests.integration.test_runtime_e2e import e2e_settings
from tests.simbooks import broker_deals
from worker.amqp.runtime import AmqpRuntime, RuntimeOptions
from worker.amqp.topology import DEAD_QUEUE
from worker.execution.outcome import Delivery, Outcome
from worker.service import Service
from worker.tools.publish import approved_trade, rpm_output

SECRET = "hunter2-not-for-the-screen"


@dataclass
class Desk:
    url: str
    database_url: str
    service: Service
    side: Broker
    outage: dict[str, bool] = field(default_factory=lambda: {"on": False})

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ, RABBITMQ_URL=self.url, DATABASE_URL=self.database_url, METRICS_PORT="0"
        )
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", "dead-letters", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def confirmation(self, key: str, seconds: float = 30.0) -> Received:
        while True:
            message = self.side.take("observer", 1, seconds)[0]
            if message.properties.message_id == key:
                return message

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def deals_of(self, key: str) -> float:
        magic = order_magic_for(uuid.UUID(key), self.service.settings.magic)  # comments are cut
        with self.service.pool.claim(10.0) as lease:
            return sum(deal.volume for deal in broker_deals(lease.session.terminal, magic))

    def dead(self) -> int:
        return ready_count(self.url, DEAD_QUEUE)


def _with_outage(
    handler: Callable[[Delivery], Outcome], outage: dict[str, bool]
) -> Callable[[Delivery], Outcome]:
    def handle(delivery: Delivery) -> Outcome:
        if outage["on"]:
            raise RuntimeError("simulated outage: terminal unreachable")
        return handler(delivery)

    return handle


@pytest.fixture(scope="module")
def desk(
    new_vhost: Callable[[], str],
    new_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Desk]:
    url, database_url = new_vhost(), new_database()
    settings = e2e_settings(url, database_url, tmp_path_factory.mktemp("desk"), "1")
    settings = settings.model_copy(update={"delivery_limit": 1})
    service = Service.start(settings)
    outage = {"on": False}
    options = RuntimeOptions(
        prefetch=service.sessions,
        delivery_limit=1,
        requeue_delay_seconds=0.05,
        sweep_interval_seconds=1.0,
        reconnect_min_delay_seconds=0.1,
        reconnect_max_delay_seconds=1.0,
    )
    runtime = AmqpRuntime(url, _with_outage(service.handler, outage), service.outbox, options)
    running = Running(runtime).start()
    side = Broker(url)
    side.bind_confirmations("observer")
    try:
        yield Desk(url, database_url, service, side, outage)
    finally:
        side.close()
        running.stop()
        service.close()


def _approval(symbol: str = "EURUSD", units: float = 10_000.0) -> dict[str, Any]:
    document = rpm_output(approved_trade(symbol, 1, units), order_id=uuid.uuid4().hex)
    document["broker_password"] = SECRET  # an unknown field the RPM might add: never shown
    return document


def _dead_letter_during_an_outage(desk: Desk, document: dict[str, Any]) -> None:
    before = desk.dead()
    desk.outage["on"] = True
    try:
        order_id = document["decision"]["order_id"]
        desk.side.publish(json.dumps(document).encode(), message_id=order_id)
        wait_until(lambda: desk.dead() == before + 1, "the approval to be dead-lettered")
    finally:
        desk.outage["on"] = False


def _listing(desk: Desk) -> list[dict[str, Any]]:
    done = desk.cli("list", "--json")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_a_dead_letter_replayed_after_the_fix_executes_once_then_answers_from_the_record(
    desk: Desk,
) -> None:
    document = _approval()
    order_id = document["decision"]["order_id"]
    key = str(execution_id_for(order_id))
    _dead_letter_during_an_outage(desk, document)

    [listed] = [item for item in _listing(desk) if item["id"] == order_id]
    assert listed["reason"] == "delivery_limit"
    assert listed["key"] == order_id
    assert listed["first_seen"] and listed["first_seen_source"] == "dead-lettered"
    assert listed["preview"].startswith('{"decision":') and len(listed["preview"]) <= 400
    assert "dead-lettered by the broker from execution.requests" in listed["details"]
    text = desk.cli("list")
    assert order_id in text.stdout and "delivery_limit" in text.stdout
    shown = desk.cli("show", order_id)
    assert shown.returncode == 0 and "x-death" in shown.stdout
    assert SECRET not in shown.stdout and '"broker_password":"***"' in shown.stdout
    assert desk.dead() == 1  # listing and showing lost nothing
    assert desk.query("SELECT count(*) FROM execution.executions") == [(0,)]

    # the cause is fixed (the outage is over): replay executes it, once
    replay = desk.cli("replay", order_id, "--actor", "ops-alice")
    assert replay.returncode == 0, replay.stderr
    first = desk.confirmation(key)
    assert json.loads(first.body)["status"] == "FILLED"
    assert desk.dead() == 0
    assert desk.deals_of(key) == pytest.approx(0.1)

    # the same approval dead-lettered again (re-sent during a second outage), replayed again:
    # answered with the recorded confirmation, no second order
    _dead_letter_during_an_outage(desk, document)
    again = desk.cli("replay", order_id, "--actor", "ops-bob")
    assert again.returncode == 0, again.stderr
    second = desk.confirmation(key)
    assert second.body == first.body
    assert desk.deals_of(key) == pytest.approx(0.1)
    assert desk.query(
        "SELECT count(*) FROM execution.executions WHERE idempotency_key = %s", order_id
    ) == [(1,)]
    actions = desk.query(
        "SELECT actor, action, message_id, idempotency_key, reason, db_user, at IS NOT NULL,"
        " detail ->> 'preview' FROM execution.operator_actions WHERE dead_letter_id = %s"
        " ORDER BY action_id",
        order_id,
    )
    assert [row[:6] for row in actions] == [
        ("ops-alice", "replay", order_id, order_id, "delivery_limit", "postgres"),
        ("ops-bob", "replay", order_id, order_id, "delivery_limit", "postgres"),
    ]
    assert all(row[6] for row in actions)
    assert all(SECRET not in (row[7] or "") for row in actions)


def test_replay_all_by_reason_and_purge_are_audited(desk: Desk) -> None:
    keyless = rpm_output(approved_trade("EURUSD", 1, 10_000.0), order_id=None)
    desk.side.publish(json.dumps(keyless).encode(), message_id=None)  # the worker refuses it
    wait_until(lambda: desk.dead() == 1, "the keyless message to be dead-lettered")
    document = _approval("GBPUSD")
    order_id = document["decision"]["order_id"]
    _dead_letter_during_an_outage(desk, document)

    listing = {item["id"]: item for item in _listing(desk)}
    assert set(listing) >= {order_id}
    [hashed] = [item for item in listing.values() if item["id"].startswith("h-")]
    assert hashed["reason"] != "delivery_limit" and hashed["key"] is None
    assert {item["id"] for item in _listing(desk)} == set(listing)  # IDs are stable

    replay = desk.cli("replay", "--all", "--reason", "delivery_limit", "--actor", "ops-carol")
    assert replay.returncode == 0, replay.stderr
    confirmation = desk.confirmation(str(execution_id_for(order_id)))
    assert json.loads(confirmation.body)["status"] == "FILLED"
    assert [item["id"] for item in _listing(desk)] == [hashed["id"]]

    assert desk.cli("replay", "no-such-id").returncode == 1
    purge = desk.cli("purge", hashed["id"], "--actor", "ops-carol", "--yes")
    assert purge.returncode == 0, purge.stderr
    assert desk.dead() == 0
    rows = desk.query(
        "SELECT action, actor, reason, body_sha256 FROM execution.operator_actions"
        " WHERE actor = 'ops-carol' ORDER BY action_id"
    )
    assert [row[:3] for row in rows] == [
        ("replay", "ops-carol", "delivery_limit"),
        ("purge", "ops-carol", hashed["reason"]),
    ]
    assert rows[1][3] == hashed["body_sha256"]
