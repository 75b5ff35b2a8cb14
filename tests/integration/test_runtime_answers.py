"""Every approval gets an answer, through the real runtime, queue and pipeline (issue 18).

- item 7: during a session outage longer than the delivery limit allows (compressed here:
  a 0.2 s claim timeout, a 0.05 s requeue delay and a delivery limit of 4), every approval
  in hand ends answered (a REJECTED confirmation, SESSION_UNAVAILABLE or STALE_APPROVAL) or
  dead-lettered with a reason header: never dead-lettered by the queue with no row;
- item 3: a provisional answer (unknown outcome) is corrected by the background reconcile
  when the order executes later: version 2 goes out with message_id "<execution_id>:v2";
- item 15, the second test of "ack only after the confirmation's confirm": with the real
  pipeline, a confirmation the broker cannot route keeps its request unacked (not requeued,
  not acked) until the outbox delivers it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from schemas.identity import execution_id_for
from tests.integration.test_amqp_support import Broker, Running, ready_count, wait_until
from tests.integration.test_runtime_e2e import SIM_CONFIG
from worker.amqp.deliveries import REJECTION_REASON_HEADER
from worker.amqp.runtime import AmqpRuntime, RuntimeOptions
from worker.amqp.topology import DEAD_QUEUE, REQUESTS_QUEUE, UNROUTED_QUEUE
from worker.config import Settings
from worker.mt5.gateway import OrderIdentity, Side
from worker.service import Service
from worker.tools.publish import approved_trade, rpm_output

DELIVERY_LIMIT = 4


@dataclass
class World:
    url: str
    database_url: str
    service: Service
    runtime: AmqpRuntime
    side: Broker

    def publish(self, document: dict[str, Any]) -> str:
        order_id: str = document["decision"]["order_id"]
        self.side.publish(json.dumps(document).encode(), message_id=order_id)
        return str(execution_id_for(order_id))

    def rows(self) -> dict[str, tuple[str, str | None]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT execution_id, state, rejection_reason FROM execution.executions"
            ).fetchall()
        return {str(row[0]): (row[1], row[2]) for row in found}


def _settings(url: str, database_url: str, directory: Path) -> Settings:
    sim = directory / "sim.toml"
    sim.write_text(SIM_CONFIG)
    sessions = directory / "sessions.toml"
    sessions.write_text(
        f'[[sessions]]\nid = "sim-answers"\nbackend = "sim"\nsim_config = "{sim}"\n'
    )
    return Settings(
        rabbitmq_url=url,  # type: ignore[arg-type]
        database_url=database_url,  # type: ignore[arg-type]
        mt5_sessions=str(sessions),
        metrics_port=0,
        order_timeout_seconds=1.0,
        reconcile_grace_seconds=0.0,
        claim_timeout_seconds=0.2,
        delivery_limit=DELIVERY_LIMIT,
        max_send_attempts=1,
        unknown_reconcile_first_seconds=0.01,
        unknown_reconcile_max_seconds=0.01,
    )


@pytest.fixture
def world(
    new_vhost: Callable[[], str], new_database: Callable[[], str], tmp_path: Path
) -> Iterator[World]:
    yield from _world(new_vhost(), new_database(), _settings, tmp_path)


@pytest.fixture
def patient_world(
    new_vhost: Callable[[], str], new_database: Callable[[], str], tmp_path: Path
) -> Iterator[World]:
    """A world whose orders may take 10 s: the settler waits for lagging deals that long."""

    def settings(url: str, database_url: str, directory: Path) -> Settings:
        return _settings(url, database_url, directory).model_copy(
            update={"order_timeout_seconds": 10.0}
        )

    yield from _world(new_vhost(), new_database(), settings, tmp_path)


def _world(
    url: str,
    database_url: str,
    make_settings: Callable[[str, str, Path], Settings],
    tmp_path: Path,
) -> Iterator[World]:
    settings = make_settings(url, database_url, tmp_path)
    service = Service.start(settings, recover=False)
    options = RuntimeOptions(
        prefetch=4,
        delivery_limit=settings.delivery_limit,
        requeue_delay_seconds=0.05,
        sweep_interval_seconds=0.5,
        reconnect_min_delay_seconds=0.1,
        reconnect_max_delay_seconds=1.0,
    )
    runtime = AmqpRuntime(url, service.handler, service.outbox, options)
    running = Running(runtime).start()
    side = Broker(url)
    try:
        yield World(url, database_url, service, runtime, side)
    finally:
        side.close()
        running.stop()
        service.close()


def _approval(**kwargs: Any) -> dict[str, Any]:
    return rpm_output(approved_trade("EURUSD", 1, 10_000.0), order_id=uuid.uuid4().hex, **kwargs)


def _stale() -> dict[str, Any]:
    document = _approval()
    old = (datetime.now(UTC) - timedelta(seconds=45)).replace(tzinfo=None).isoformat()
    document["decision"]["approved_trade"]["timestamp"] = old
    return document


def test_a_session_outage_leaves_no_approval_without_an_answer(world: World) -> None:
    world.side.bind_confirmations("observer")
    with world.service.pool.claim(10.0):  # the outage: no session for anyone else
        fresh = [world.publish(_approval()) for _ in range(5)]
        stale = world.publish(_stale())
        wanted = {*fresh, stale}
        got: dict[str, dict[str, Any]] = {}
        while len(got) < len(wanted):
            (message,) = world.side.take("observer", 1, 60.0)
            document = json.loads(message.body)
            got[document["execution_id"]] = document
    assert set(got) == wanted
    for key in fresh:
        assert (got[key]["status"], got[key]["rejection_reason"]) == (
            "REJECTED",
            "SESSION_UNAVAILABLE",
        )
    assert got[stale]["rejection_reason"] == "STALE_APPROVAL"
    rows = world.rows()
    assert {key: rows[key][0] for key in wanted} == dict.fromkeys(wanted, "REJECTED")
    assert world.side.drain(DEAD_QUEUE) == []  # nothing dead-lettered without a row
    wait_until(lambda: world.runtime.stats.acked == len(wanted), "every request acked")


def test_the_last_delivery_without_a_database_is_dead_lettered_with_a_reason(
    world: World,
) -> None:
    world.service.store.pool.close()  # the database is gone for this worker
    key = world.publish(_approval())
    (dead,) = world.side.take(DEAD_QUEUE, 1, 60.0)
    headers = dead.properties.headers or {}
    assert headers.get(REJECTION_REASON_HEADER) in ("DATABASE_UNAVAILABLE", "IN_FLIGHT")
    assert key  # the approval is accounted for: dead-lettered with its reason


def test_nothing_bound_the_confirmation_waits_in_the_unrouted_queue(world: World) -> None:
    """Nothing is bound to execution.confirmations: the committed confirmation is returned
    (mandatory), moved to execution.confirmations.unrouted, and only then is the request acked."""
    key = world.publish(_approval())
    (message,) = world.side.take(UNROUTED_QUEUE, 1, 30.0)
    assert message.properties.message_id == key
    assert world.rows()[key][0] == "FILLED"
    wait_until(lambda: world.runtime.stats.acked == 1, "the ack after the confirm")
    assert world.runtime.stats.requeued == 0
    assert ready_count(world.url, REQUESTS_QUEUE) == 0


def test_a_late_execution_goes_out_as_version_2(world: World) -> None:
    world.side.bind_confirmations("observer")
    with world.service.pool.claim(10.0) as lease:
        lease.session.terminal.set_faults(scripted=("timeout",))  # 10012, nothing executed
    key = world.publish(_approval())
    (first,) = world.side.take("observer", 1, 30.0)
    provisional = json.loads(first.body)
    assert first.properties.message_id == key
    assert (provisional["status"], provisional["provisional"]) == ("FAILED", True)
    wait_until(lambda: world.runtime.stats.acked == 1, "the request acked on the provisional")

    with world.service.pool.claim(10.0) as lease:  # the broker executes it later
        with psycopg.connect(world.database_url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT magic, comment_token FROM execution.executions WHERE execution_id = %s",
                (uuid.UUID(key),),
            ).fetchone()
        assert found is not None
        gateway = lease.session.gateway
        reply = gateway.send(
            gateway.symbol_spec("EURUSD"),
            Side.BUY,
            0.1,
            identity=OrderIdentity(found[0], found[1]),
            deviation=50,
        )
        assert reply.status == "done", reply
    time.sleep(1.0)  # "later": past the hardened server's deal lag (< 1 s)
    wait_until(lambda: bool(world.service.recheck_unknown()), "a due UNKNOWN row")

    (second,) = world.side.take("observer", 1, 30.0)
    corrected = json.loads(second.body)
    assert second.properties.message_id == f"{key}:v2"
    assert corrected["execution_id"] == key and corrected["version"] == 2
    assert (corrected["status"], corrected["provisional"]) == ("FILLED", False)
    assert corrected["executed_lots"] == 0.1 and len(corrected["broker_deals"]) == 1


def test_deliveries_waiting_on_the_settler_are_unacked_then_each_answered(
    patient_world: World,
) -> None:
    """Issue 26: the reply names no deal and the deals lag: the delivery waits, unacked and
    off its session, for the settler's confirmation; its copies, waiting on the same
    execution, each get the confirmation and their ack."""
    world = patient_world
    world.side.bind_confirmations("observer")
    with world.service.pool.claim(10.0) as lease:
        lease.session.terminal.set_faults(
            deal_zero_rate=1.0, deal_lag_ms=3000.0, deal_lag_jitter_ms=0.0
        )
    document = _approval()
    body = json.dumps(document).encode()
    order_id = document["decision"]["order_id"]
    for _ in range(3):  # the RPM published it three times
        world.side.publish(body, message_id=order_id)
    key = str(execution_id_for(order_id))
    wait_until(lambda: key in world.rows(), "the order sent")
    with world.service.pool.claim(0.5):  # its only session is free while the deals lag
        assert world.rows()[key][0] == "SUBMITTED"
        assert world.runtime.stats.acked == 0 and ready_count(world.url, REQUESTS_QUEUE) == 0
    copies = world.side.take("observer", 3, 30.0)
    assert {m.properties.message_id for m in copies} == {key}
    assert {json.loads(m.body)["status"] for m in copies} == {"FILLED"}
    wait_until(lambda: world.runtime.stats.acked == 3, "every copy acked")
    assert world.rows()[key][0] == "FILLED"
