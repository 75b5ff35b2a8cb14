"""RabbitMQ and PostgreSQL go away mid-stream; the running worker must ride it out alone."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import psycopg
import pytest

from schemas.identity import execution_id_for
from tests.containers import Broker, Service
from tests.faults.conftest import MakeEnv
from tests.faults.harness import FaultEnv, Tally, approvals, sim_toml

pytestmark = pytest.mark.faults

WAIT_SECONDS = 120.0
PG_DOWN_SECONDS = 10.0


def _confirmed_at_least(env: FaultEnv, count: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while len(env.broker_side.confirmed_keys()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} confirmations"
        time.sleep(0.2)


def _drop_connections(broker: Broker, url: str) -> None:
    vhost = unquote(urlsplit(url).path[1:])
    broker.ctl("close_all_connections", "-p", vhost, "fault suite: connections dropped")


def test_rabbitmq_stopped_and_started_mid_stream(
    make_env: MakeEnv,
    rabbitmq_broker: Broker,
    record: Callable[[Tally], None],
    note: Callable[[str], None],
) -> None:
    rng = random.Random(41)
    env = make_env([sim_toml(seed=41), sim_toml(seed=42)])
    first = env.publish(approvals(80, rng))
    worker = env.start_worker()
    _confirmed_at_least(env, 20)
    if rabbitmq_broker.backend == "container":
        rabbitmq_broker.unavailable_for(5.0).join()
        how = "container stopped 5 s, started; then connections closed twice"
    else:
        _drop_connections(rabbitmq_broker, env.rabbitmq_url)
        how = "connections closed three times (machine's broker: not ours to stop)"
        note(
            "RabbitMQ fell back to the machine's broker: `rabbitmqctl close_all_connections`"
            " scoped to the test vhost replaced the stop/start"
        )
    assert worker.alive(), worker.tail()
    second = env.publish(approvals(80, rng))
    _confirmed_at_least(env, 100)
    _drop_connections(rabbitmq_broker, env.rabbitmq_url)
    _confirmed_at_least(env, 130)
    _drop_connections(rabbitmq_broker, env.rabbitmq_url)
    keys = first + second
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    # the one worker process reconnected by itself
    assert len(env.workers) == 1
    record(env.check("RabbitMQ outage + dropped connections", keys, notes=how))


def _database_down(postgres_server: Service, database_url: str) -> Callable[[], None]:
    """Make the database unreachable now; return the function that brings it back."""
    if postgres_server.backend == "container":
        postgres_server.stop()
        return postgres_server.start
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )

    def back() -> None:
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    return back


def test_postgresql_unavailable_for_10_seconds(
    make_env: MakeEnv,
    postgres_server: Service,
    record: Callable[[Tally], None],
    note: Callable[[str], None],
) -> None:
    env = make_env([sim_toml(seed=51), sim_toml(seed=52)])
    keys = env.publish(approvals(120, random.Random(51)))
    worker = env.start_worker()
    _confirmed_at_least(env, 20)
    back = _database_down(postgres_server, env.database_url)
    down_at = datetime.now(UTC)
    if postgres_server.backend != "container":
        note(
            "PostgreSQL fell back to the machine's server: the test database refused"
            " connections (ALLOW_CONNECTIONS false + pg_terminate_backend) instead of a stop"
        )
    time.sleep(PG_DOWN_SECONDS)
    assert worker.alive(), worker.tail()
    books = {int(deal["magic"]) for deal in env.deals()}
    confirmed = env.broker_side.confirmed_keys()
    back()

    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    assert len(env.workers) == 1  # it recovered by itself
    how = "container stopped" if postgres_server.backend == "container" else "connections refused"
    tally = env.check("PostgreSQL down 10 s", keys, notes=f"{how} 10 s mid-stream")
    by_magic = {env.magic_of(k): k for k in keys}
    rows = env.rows()
    by_execution_id = {str(execution_id_for(k)): k for k in keys}
    # every order on the books when the outage ended had its intent committed before it began
    for magic in books:
        submitted_at = rows[by_magic[magic]][0][3]
        assert submitted_at is not None and submitted_at < down_at, (magic, submitted_at)
    # nothing was confirmed (hence acked) that had not been committed before the outage
    for execution_id in confirmed:
        completed_at = rows[by_execution_id[execution_id]][0][4]
        assert completed_at < down_at, (execution_id, completed_at)
    assert len(confirmed) < len(keys)  # the outage did interrupt work
    record(tally)
