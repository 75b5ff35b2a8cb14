"""Least privilege, proven on the real services.

PostgreSQL: ``deploy/sql/roles.sql`` creates an owner (migrations) and a worker role in a
fresh database; the REAL pipeline runs as the worker role (a fill, a refusal, an invalid
request, the outbox), and every write outside its grant fails with a permission error.

RabbitMQ: a user with the ``deploy/rabbitmq/permissions.env`` regexes in a fresh vhost runs
the real runtime (topology declare, consume, confirmations, reply_to, dead letters) and is
refused on every other name.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg
import pytest

from schemas.request import MessageProperties
from tests.containers import Broker, Service
from tests.integration.pipeline_env import always_open, answered, approval
from tests.integration.test_amqp_support import Running, wait_until
from tests.simbooks import broker_deals
from worker.amqp.runtime import REJECTION_REASON_HEADER, AmqpRuntime, RuntimeOptions
from worker.amqp.topology import (
    CONFIRMATIONS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_QUEUE,
    REQUESTS_QUEUE,
)
from worker.config import load_settings
from worker.execution.outcome import DeadLetter, Delivery, Outcome, Publish
from worker.execution.pipeline import Pipeline
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec
from worker.mt5.sim.terminal import SimConfig, SimTerminal
from worker.pool.pool import SessionPool
from worker.service import gateway_factory
from worker.store.migrate import apply_migrations, migrations
from worker.store.store import Store
from worker.tools.trail import find_trails

ROOT = Path(__file__).resolve().parents[2]
ROLES_SQL = ROOT / "deploy" / "sql" / "roles.sql"
PERMISSIONS = ROOT / "deploy" / "rabbitmq" / "permissions.env"


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


# ----------------------------------------------------------------------------- PostgreSQL


@dataclass
class Roles:
    admin_url: str
    owner_url: str
    worker_url: str
    operator_url: str


def _psql(url: str, *variables: str) -> None:
    command = ["psql", "-q", "-X", url, *variables, "-f", str(ROLES_SQL)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def roles(postgres_server: Service, new_database: Callable[[], str]) -> Iterator[Roles]:
    admin_url = new_database()
    suffix = uuid.uuid4().hex[:8]
    owner, worker = f"ew_owner_{suffix}", f"ew_worker_{suffix}"
    operator = f"ew_operator_{suffix}"
    owner_pw, worker_pw, operator_pw = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    variables = ["-v", f"owner_role={owner}", "-v", f"worker_role={worker}"]
    variables += ["-v", f"operator_role={operator}"]
    secrets = ["-v", f"owner_password='{owner_pw}'", "-v", f"worker_password='{worker_pw}'"]
    secrets += ["-v", f"operator_password='{operator_pw}'"]
    _psql(admin_url, *variables, *secrets)
    owner_url = with_user(admin_url, owner, owner_pw)
    with psycopg.connect(owner_url, autocommit=True) as conn:
        assert apply_migrations(conn) == [v for v, _ in migrations()]  # `migrate` as the owner
    _psql(admin_url, *variables)  # again after the migration: grants on the new tables
    try:
        yield Roles(
            admin_url,
            owner_url,
            with_user(admin_url, worker, worker_pw),
            with_user(admin_url, operator, operator_pw),
        )
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            for role in (operator, worker, owner):
                conn.execute(f'DROP OWNED BY "{role}" CASCADE')
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as conn:
            database = urlsplit(admin_url).path.lstrip("/")
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            for role in (operator, worker, owner):
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture(scope="module")
def pipeline_as_worker(roles: Roles) -> Iterator[tuple[Pipeline, Store, SimTerminal]]:
    """The real pipeline over the worker role's connections (no migration: the owner did)."""
    settings = load_settings({"DATABASE_URL": roles.worker_url, "MT5_SESSIONS": "1"})
    settings = settings.model_copy(update={"reconcile_grace_seconds": 0.0})
    store = Store.open(roles.worker_url, max_size=4)
    sim = SimTerminal(always_open(SimConfig()))
    assert sim.initialize()

    def opener(spec: SessionSpec) -> api.Terminal:
        del spec
        return sim

    pool = SessionPool(
        [SessionSpec(id="sim-priv", backend="sim")],
        store.pool,
        gateway_factory(settings),
        opener=opener,
    )
    try:
        yield Pipeline(settings, store, pool), store, sim
    finally:
        pool.close()
        store.close()


def _deliver(pipeline: Pipeline, body: bytes, message_id: str | None = None) -> Outcome:
    return answered(pipeline, _handle(pipeline, body, message_id))


def _handle(pipeline: Pipeline, body: bytes, message_id: str | None = None) -> Outcome:
    return pipeline.handle(
        Delivery(
            body=body,
            properties=MessageProperties(content_type="application/json", message_id=message_id),
            redelivered=False,
            delivery_count=None,
            received_at=datetime.now(UTC),
        )
    )


def test_the_worker_role_runs_the_real_pipeline(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal]
) -> None:
    pipeline, store, sim = pipeline_as_worker
    outcomes = {
        "FILLED": _deliver(pipeline, json.dumps(approval("EURUSD", 1, 10_000.0)).encode()),
        "REJECTED": _deliver(pipeline, json.dumps(approval(kill_switch_triggered=True)).encode()),
        "INVALID": _deliver(pipeline, b"{not json", message_id=f"m-{uuid.uuid4().hex}"),
    }
    statuses = {}
    for name, outcome in outcomes.items():
        assert isinstance(outcome, Publish), (name, outcome)
        statuses[name] = json.loads(outcome.payload)["status"]
    assert statuses == {"FILLED": "FILLED", "REJECTED": "REJECTED", "INVALID": "REJECTED"}
    assert len(broker_deals(sim)) == 1  # the books: the history's deals may lag the reply

    # the runtime's outbox calls, and the reads of health and trail
    pending = store.unpublished(10)
    assert {p.execution_id for p in pending} == {
        o.execution_id for o in outcomes.values() if isinstance(o, Publish)
    }
    store.mark_failed([pending[0].execution_id])  # refused by the broker: backs off
    assert pending[0].execution_id not in {p.execution_id for p in store.unpublished(10)}
    store.mark_published([p.execution_id for p in pending])
    assert store.unpublished(10) == [] and store.outbox_backlog()[0] == 0
    assert store.ping()
    with store.connection() as conn:
        assert store.in_flight(conn) == []
        filled = outcomes["FILLED"]
        assert isinstance(filled, Publish)
        assert find_trails(conn, str(filled.execution_id))


THIS_MONTH_EVENTS = f"execution_events_p{datetime.now(UTC):%Y%m}"
THIS_MONTH_OUTBOX = f"outbox_p{datetime.now(UTC):%Y%m}"

FORBIDDEN = (
    "UPDATE execution.execution_events SET stage = 'forged'",
    "DELETE FROM execution.execution_events",
    "TRUNCATE execution.execution_events",
    "DELETE FROM execution.executions",
    "TRUNCATE execution.executions",
    "DELETE FROM execution.outbox",
    "UPDATE execution.outbox SET payload = 'forged'",
    "UPDATE execution.schema_migrations SET version = 99",
    "CREATE TABLE execution.evil (x int)",
    "CREATE TABLE public.evil (x int)",
    "CREATE SCHEMA evil",
    "ALTER TABLE execution.executions ADD COLUMN evil int",
    "ALTER TABLE execution.execution_events DISABLE TRIGGER execution_events_append_only",
    "DROP TRIGGER execution_events_append_only ON execution.execution_events",
    "DROP TABLE execution.outbox",
    "DROP SCHEMA execution CASCADE",
    "CREATE FUNCTION execution.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE INDEX evil ON execution.executions (symbol)",
    # ALTER on every table, and every way to switch the append-only trigger off
    "ALTER TABLE execution.outbox ADD COLUMN evil int",
    "ALTER TABLE execution.execution_events ALTER COLUMN stage DROP NOT NULL",
    "ALTER TABLE execution.schema_migrations ADD COLUMN evil int",
    "ALTER TABLE execution.execution_events DISABLE TRIGGER ALL",
    "ALTER TABLE execution.execution_events DISABLE TRIGGER USER",
    "ALTER TABLE execution.execution_events ENABLE REPLICA TRIGGER execution_events_append_only",
    "ALTER TABLE execution.execution_events OWNER TO CURRENT_USER",
    "ALTER TABLE execution.executions RENAME TO evil",
    "SET session_replication_role = replica",
    # retention is the owner's: no partition can be detached, dropped, emptied or made
    f"ALTER TABLE execution.execution_events DETACH PARTITION execution.{THIS_MONTH_EVENTS}",
    f"ALTER TABLE execution.outbox DETACH PARTITION execution.{THIS_MONTH_OUTBOX}",
    f"DROP TABLE execution.{THIS_MONTH_EVENTS}",
    f"DROP TABLE execution.{THIS_MONTH_OUTBOX}",
    "DROP TABLE execution.execution_events_default",
    f"DELETE FROM execution.{THIS_MONTH_EVENTS}",
    f"UPDATE execution.{THIS_MONTH_EVENTS} SET stage = 'forged'",
    f"TRUNCATE execution.{THIS_MONTH_EVENTS}",
    "TRUNCATE execution.execution_events_default",
    f"DELETE FROM execution.{THIS_MONTH_OUTBOX}",
    f"ALTER TABLE execution.{THIS_MONTH_EVENTS} DISABLE TRIGGER ALL",
    "CREATE TABLE execution.execution_events_p209901 PARTITION OF execution.execution_events"
    " FOR VALUES FROM ('2099-01-01') TO ('2099-02-01')",
    "SELECT execution.ensure_partitions(24)",
)


@pytest.mark.parametrize("statement", FORBIDDEN)
def test_the_worker_role_cannot_rewrite_the_audit_trail_or_the_schema(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal], statement: str
) -> None:
    with (
        psycopg.connect(roles.worker_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege) as info,
    ):
        conn.execute(statement)
    message = str(info.value)
    # refused by privileges, not merely by the append-only trigger
    assert "permission denied" in message or "must be owner" in message, message


def test_the_worker_role_owns_nothing_and_cannot_become_the_owner(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal]
) -> None:
    owner = urlsplit(roles.owner_url).username
    with psycopg.connect(roles.worker_url, autocommit=True) as conn:
        owned = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'execution' AND pg_has_role(c.relowner, 'USAGE')"
        ).fetchone()
        assert owned == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f'SET ROLE "{owner}"')
        # and the append-only triggers are still there and enabled after all the attempts,
        # on the table and on every one of its partitions
        states = conn.execute(
            "SELECT c.relname, t.tgname, t.tgenabled FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname IN ('execution_events_append_only', 'execution_events_no_truncate')"
        ).fetchall()
        partitions = conn.execute(
            "SELECT count(*) FROM pg_inherits"
            " WHERE inhparent = 'execution.execution_events'::regclass"
        ).fetchone()
        assert partitions is not None and partitions[0] >= 5  # default + this month + 3
        assert len(states) == 2 * (partitions[0] + 1)
        assert {state for _, _, state in states} == {"O"}


def test_the_owner_still_cannot_edit_events_the_trigger_holds(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal]
) -> None:
    with (
        psycopg.connect(roles.owner_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege) as info,
    ):
        conn.execute("DELETE FROM execution.execution_events")
    assert "append-only" in str(info.value)


def test_the_owner_retires_whole_partitions_the_worker_cannot(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal], tmp_path: Path
) -> None:
    from worker.tools.retention import retire

    with psycopg.connect(roles.owner_url, autocommit=True) as conn:
        conn.execute("SELECT execution.ensure_partitions(0, ARRAY['2020-01-15'::timestamptz])")
        key = uuid.uuid4()
        conn.execute(
            "INSERT INTO execution.executions"
            " (execution_id, idempotency_key, state, comment_token, received_at)"
            " VALUES (%s, %s, 'FILLED', 't', '2020-01-15')",
            (key, f"k-{key}"),
        )
        conn.execute(
            "INSERT INTO execution.execution_events (execution_id, at, stage, kind)"
            " VALUES (%s, '2020-01-15', 'submit', 'transition')",
            (key,),
        )
    with psycopg.connect(roles.worker_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            retire(conn, datetime.now(UTC), archive_dir=tmp_path, out=lambda _: None)
        assert conn.execute(
            "SELECT count(*) FROM execution.execution_events_p202001"
        ).fetchone() == (1,)
    with psycopg.connect(roles.owner_url, autocommit=True) as conn:
        cutoff = datetime(2021, 1, 1, tzinfo=UTC)
        assert retire(conn, cutoff, archive_dir=tmp_path, out=lambda _: None) == 0
        gone = conn.execute("SELECT to_regclass('execution.execution_events_p202001')")
        assert gone.fetchone() == (None,)
    assert (tmp_path / "execution_events_p202001.csv.gz").exists()


def test_migrate_makes_partitions_ahead_as_the_owner_only(
    roles: Roles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main as cli_main

    monkeypatch.delenv("DATABASE_URL_FILE", raising=False)
    with psycopg.connect(roles.owner_url, autocommit=True) as conn:
        far = f"execution_events_p{datetime.now(UTC).year + 1}{datetime.now(UTC):%m}"
        assert conn.execute("SELECT to_regclass(%s)::text", (f"execution.{far}",)).fetchone() == (
            None,
        )
    monkeypatch.setenv("DATABASE_URL", roles.worker_url)
    assert cli_main(["retention", "--months-ahead", "12"]) == 1
    assert cli_main(["migrate"]) == 1
    assert "not the schema owner" in capsys.readouterr().out
    monkeypatch.setenv("DATABASE_URL", roles.owner_url)
    assert cli_main(["retention", "--months-ahead", "12"]) == 0
    assert cli_main(["migrate"]) == 0
    with psycopg.connect(roles.worker_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass(%s)::text", (f"execution.{far}",)).fetchone() == (
            f"execution.{far}",
        )


def test_migration_0004_keeps_the_workers_grants(
    roles: Roles, new_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrading from migration 3: the worker can still publish and append right after the
    partitioning migration, before roles.sql is re-run."""
    from worker.store import migrate

    owner = urlsplit(roles.owner_url).username or ""
    worker = urlsplit(roles.worker_url).username or ""
    names = ["-v", f"owner_role={owner}", "-v", f"worker_role={worker}"]
    admin_url = new_database()
    database = urlsplit(admin_url).path.lstrip("/")
    owner_url = urlunsplit(urlsplit(roles.owner_url)._replace(path=f"/{database}"))
    worker_url = urlunsplit(urlsplit(roles.worker_url)._replace(path=f"/{database}"))
    every = migrate.migrations()
    try:
        _psql(admin_url, *names)
        with psycopg.connect(owner_url, autocommit=True) as conn:
            monkeypatch.setattr(migrate, "migrations", lambda: every[:3])
            assert apply_migrations(conn) == [1, 2, 3]
            monkeypatch.undo()
        _psql(admin_url, *names)
        key = uuid.uuid4()
        with psycopg.connect(worker_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO execution.executions"
                " (execution_id, idempotency_key, state, comment_token, received_at)"
                " VALUES (%s, %s, 'FILLED', 't', now())",
                (key, f"k-{key}"),
            )
            conn.execute(
                "INSERT INTO execution.outbox (execution_id, routing_key, payload)"
                " VALUES (%s, 'r', '{}')",
                (key,),
            )
        with psycopg.connect(owner_url, autocommit=True) as conn:
            assert apply_migrations(conn) == [v for v, _ in every[3:]]  # 4 and any later
        with psycopg.connect(worker_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO execution.execution_events (execution_id, at, stage, kind)"
                " VALUES (%s, now(), 'submit', 'transition')",
                (key,),
            )
            published = conn.execute(
                "UPDATE execution.outbox SET published_at = now(), attempts = 1"
                " WHERE execution_id = %s",
                (key,),
            )
            assert published.rowcount == 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE execution.outbox SET payload = 'forged'")
    finally:
        with psycopg.connect(roles.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def test_roles_sql_is_idempotent(roles: Roles) -> None:
    # a third run (e.g. after the next migration) changes nothing and fails on nothing
    suffix = urlsplit(roles.worker_url).username or ""
    owner = suffix.replace("ew_worker_", "ew_owner_")
    operator = suffix.replace("ew_worker_", "ew_operator_")
    _psql(
        roles.admin_url,
        *("-v", f"owner_role={owner}", "-v", f"worker_role={suffix}"),
        *("-v", f"operator_role={operator}"),
    )


_ACTION = (
    "INSERT INTO execution.operator_actions (actor, action, queue, dead_letter_id, body_sha256)"
    " VALUES ('test', 'purge', 'execution.requests.dead', 'm-1', 'abc')"
)
OPERATOR_FORBIDDEN = (
    "UPDATE execution.operator_actions SET actor = 'forged'",
    "DELETE FROM execution.operator_actions",
    "TRUNCATE execution.operator_actions",
    "INSERT INTO execution.executions (execution_id, idempotency_key, state, comment_token,"
    " received_at) VALUES (gen_random_uuid(), 'k', 'FILLED', 't', now())",
    "UPDATE execution.executions SET state = 'FILLED'",
    "INSERT INTO execution.outbox (execution_id, routing_key, payload)"
    " SELECT execution_id, 'r', 'p' FROM execution.executions LIMIT 1",
    "INSERT INTO execution.execution_events (execution_id, at, stage, kind)"
    " SELECT execution_id, now(), 's', 'k' FROM execution.executions LIMIT 1",
    "CREATE TABLE execution.evil (x int)",
    "ALTER TABLE execution.operator_actions DISABLE TRIGGER operator_actions_append_only",
)


def test_the_operator_role_reads_the_store_and_appends_its_actions(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal]
) -> None:
    with psycopg.connect(roles.operator_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM execution.executions").fetchone()
        assert find_trails(conn, "no-such-key") == []
        conn.execute(_ACTION)
        assert conn.execute("SELECT count(*) FROM execution.operator_actions").fetchone() >= (1,)


@pytest.mark.parametrize("statement", OPERATOR_FORBIDDEN)
def test_the_operator_role_cannot_rewrite_anything(
    roles: Roles, pipeline_as_worker: tuple[Pipeline, Store, SimTerminal], statement: str
) -> None:
    with (
        psycopg.connect(roles.operator_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(statement)


def test_the_worker_role_cannot_forge_an_operator_action(roles: Roles) -> None:
    with (
        psycopg.connect(roles.worker_url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(_ACTION)


def test_the_owner_still_cannot_edit_operator_actions_the_trigger_holds(roles: Roles) -> None:
    with psycopg.connect(roles.owner_url, autocommit=True) as conn:
        conn.execute(_ACTION)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("DELETE FROM execution.operator_actions")
    assert "append-only" in str(info.value)


# ----------------------------------------------------------------------------- RabbitMQ


def _regexes() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in PERMISSIONS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = shlex.split(value)[0]
    return values


@pytest.fixture(scope="module")
def restricted(rabbitmq_broker: Broker, new_vhost: Callable[[], str]) -> Iterator[tuple[str, str]]:
    """(admin url, restricted user's url) on a fresh vhost."""
    admin_url = new_vhost()
    vhost = unquote(urlsplit(admin_url).path.lstrip("/"))
    user, password = f"ew-worker-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    regexes = _regexes()
    rabbitmq_broker.ctl("add_user", user, password)
    try:
        rabbitmq_broker.ctl(
            "set_permissions",
            "-p",
            vhost,
            user,
            regexes["WORKER_CONFIGURE"],
            regexes["WORKER_WRITE"],
            regexes["WORKER_READ"],
        )
        yield admin_url, with_user(admin_url, user, password)
    finally:
        rabbitmq_broker.ctl("delete_user", user)


class Outbox:
    def unpublished(self, limit: int) -> list[Publish]:
        return []

    def mark_published(self, execution_ids: Sequence[uuid.UUID]) -> None:
        del execution_ids


def handler(delivery: Delivery) -> Outcome:
    message_id = delivery.properties.message_id
    if not message_id:
        return DeadLetter("missing_idempotency_key", "no key")
    execution_id = uuid.uuid5(uuid.NAMESPACE_URL, message_id)
    payload = json.dumps({"execution_id": str(execution_id), "status": "REJECTED"}).encode()
    return Publish(
        execution_id,
        "confirmation.rejected.EURUSD",
        payload,
        message_id,
        delivery.properties.reply_to,
    )


def _take(channel: Any, queue: str, count: int) -> list[tuple[Any, bytes]]:
    got: list[tuple[Any, bytes]] = []

    def enough() -> bool:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((properties, body))
        return len(got) >= count

    wait_until(enough, f"{count} message(s) on {queue}")
    return got


def test_a_restricted_user_runs_the_worker(restricted: tuple[str, str]) -> None:
    admin_url, worker_url = restricted
    options = RuntimeOptions(prefetch=2, requeue_delay_seconds=0.1, sweep_interval_seconds=1.0)
    running = Running(AmqpRuntime(worker_url, handler, Outbox(), options)).start()
    try:
        with pika.BlockingConnection(pika.URLParameters(admin_url)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare("observer", durable=True)
            channel.queue_bind("observer", CONFIRMATIONS_EXCHANGE, "confirmation.#")
            channel.queue_declare("rpm.replies", durable=True)
            props = pika.BasicProperties(message_id="k-1", reply_to="rpm.replies")
            channel.basic_publish("", REQUESTS_QUEUE, b"{}", props)
            channel.basic_publish("", REQUESTS_QUEUE, b"garbage", pika.BasicProperties())
            (confirmed, _), *_ = _take(channel, "observer", 1)
            (replied, _), *_ = _take(channel, "rpm.replies", 1)
            (dead, _), *_ = _take(channel, DEAD_QUEUE, 1)
        assert confirmed.correlation_id == replied.correlation_id == "k-1"
        assert dead.headers[REJECTION_REASON_HEADER] == "missing_idempotency_key"
        assert running.runtime.stats.acked == 2
    finally:
        assert running.stop() == 0


def _refused(worker_url: str, action: Callable[[Any], Any]) -> None:
    with pika.BlockingConnection(pika.URLParameters(worker_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            action(channel)
        assert info.value.reply_code == 403, info.value


@contextmanager
def _role_user(broker: Broker, admin_url: str, role: str) -> Iterator[str]:
    """A user with the ``role``'s permissions (deploy/rabbitmq/permissions.env: ROLE_CONFIGURE,
    ROLE_WRITE, ROLE_READ) in ``admin_url``'s vhost, removed afterwards: its URL."""
    vhost = unquote(urlsplit(admin_url).path.lstrip("/"))
    user, password = f"ew-{role.lower()}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    regexes = _regexes()
    broker.ctl("add_user", user, password)
    try:
        broker.ctl(
            "set_permissions",
            "-p",
            vhost,
            user,
            regexes[f"{role}_CONFIGURE"],
            regexes[f"{role}_WRITE"],
            regexes[f"{role}_READ"],
        )
        yield with_user(admin_url, user, password)
    finally:
        broker.ctl("delete_user", user)


# a quorum queue like execution.requests, declared by the admin for the scaler to look at
PROBE_QUEUE = "execution.requests.probe"


@pytest.fixture(scope="module")
def monitor(rabbitmq_broker: Broker, restricted: tuple[str, str]) -> Iterator[str]:
    """KEDA's scaler user (MONITOR_* regexes) in the restricted user's vhost."""
    admin_url, _ = restricted
    with _role_user(rabbitmq_broker, admin_url, "MONITOR") as user_url:
        with pika.BlockingConnection(pika.URLParameters(admin_url)) as connection:
            channel = connection.channel()
            channel.queue_declare(PROBE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            channel.confirm_delivery()
            for _ in range(3):
                channel.basic_publish("", PROBE_QUEUE, b"{}")
        yield user_url


def test_the_monitoring_user_reads_the_queue_depth(monitor: str) -> None:
    # what KEDA's rabbitmq scaler (protocol amqp, mode QueueLength) does
    with pika.BlockingConnection(pika.URLParameters(monitor)) as connection:
        declared = connection.channel().queue_declare(PROBE_QUEUE, passive=True)
    assert declared.method.message_count >= 3


@pytest.mark.parametrize(
    "action",
    [
        lambda ch: ch.basic_publish("", PROBE_QUEUE, b"{}"),
        lambda ch: ch.basic_publish("amq.topic", "x", b"x"),
        lambda ch: ch.basic_get(PROBE_QUEUE),
        lambda ch: ch.basic_consume(PROBE_QUEUE, lambda *a: None),
        lambda ch: ch.queue_purge(PROBE_QUEUE),
        lambda ch: ch.queue_declare("monitor.tap", durable=True),
    ],
    ids=["publish-default-exchange", "publish-amq.topic", "get", "consume", "purge", "declare"],
)
def test_the_monitoring_user_can_only_look(monitor: str, action: Callable[[Any], Any]) -> None:
    _refused(monitor, action)


@pytest.mark.parametrize(
    "action",
    [
        lambda ch: ch.queue_declare("other.queue", durable=True),
        lambda ch: ch.exchange_declare("evil", exchange_type="fanout"),
        lambda ch: ch.basic_publish("amq.topic", "x", b"x"),
        lambda ch: ch.basic_publish("amq.fanout", "", b"x"),
        lambda ch: ch.basic_consume(DEAD_QUEUE, lambda *a: None),
        lambda ch: ch.basic_get(DEAD_QUEUE),
        lambda ch: ch.queue_bind(REQUESTS_QUEUE, CONFIRMATIONS_EXCHANGE, "#"),
        lambda ch: ch.exchange_bind(DEAD_LETTER_EXCHANGE, CONFIRMATIONS_EXCHANGE, "#"),
        lambda ch: ch.queue_declare("", exclusive=True),
    ],
    ids=[
        "declare-other-queue",
        "declare-exchange",
        "publish-amq.topic",
        "publish-amq.fanout",
        "consume-dead-letters",
        "get-dead-letters",
        "tap-confirmations",
        "exchange-bind",
        "server-named-queue",
    ],
)
def test_the_restricted_user_is_refused_elsewhere(
    restricted: tuple[str, str], action: Callable[[Any], Any]
) -> None:
    admin_url, worker_url = restricted
    with pika.BlockingConnection(pika.URLParameters(admin_url)) as connection:
        channel = connection.channel()  # the topology exists (declared by the admin here)
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, "fanout", durable=True)
        channel.queue_declare(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        channel.exchange_declare(CONFIRMATIONS_EXCHANGE, "topic", durable=True)
    _refused(worker_url, action)


@pytest.fixture(scope="module")
def operator(rabbitmq_broker: Broker, restricted: tuple[str, str]) -> Iterator[str]:
    """The dead-letters tool's operator (OPERATOR_* regexes) in the restricted user's vhost."""
    admin_url, _ = restricted
    with _role_user(rabbitmq_broker, admin_url, "OPERATOR") as user_url:
        with pika.BlockingConnection(pika.URLParameters(admin_url)) as connection:
            channel = connection.channel()
            channel.queue_declare(DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_declare(
                REQUESTS_QUEUE,
                durable=True,
                arguments={"x-queue-type": "quorum", "x-delivery-limit": 20,
                           "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
            )  # fmt: skip
        yield user_url


def test_the_operator_browses_the_dead_letters_and_can_replay(operator: str) -> None:
    """What `dead-letters` needs. RabbitMQ's *read* also lets it queue.purge the dead queue
    (unaudited): deploy/rabbitmq/README.md says so."""
    with pika.BlockingConnection(pika.URLParameters(operator)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", DEAD_QUEUE, b"{}", mandatory=True)  # amq.default: allowed
        method, _, _ = channel.basic_get(DEAD_QUEUE, auto_ack=False)
        assert method is not None
        channel.basic_nack(method.delivery_tag, requeue=True)  # `list` gives it back
        channel.basic_publish("", REQUESTS_QUEUE, b"{}", mandatory=True)  # replay


@pytest.mark.parametrize(
    "action",
    [
        lambda ch: ch.basic_get(REQUESTS_QUEUE),
        lambda ch: ch.basic_publish(CONFIRMATIONS_EXCHANGE, "confirmation.filled.X", b"x"),
        lambda ch: ch.queue_declare("operator.tap", durable=True),
    ],
    ids=["consume-requests", "forge-confirmation", "declare"],
)
def test_the_operator_is_refused_elsewhere(operator: str, action: Callable[[Any], Any]) -> None:
    _refused(operator, action)
