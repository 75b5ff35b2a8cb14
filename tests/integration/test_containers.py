"""The test services: isolation, restarts keeping their URL, data surviving outages, and the
backend choice (containers, loud fallback, CI refusing to fall back)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg
import pytest

from tests.containers import Broker, ContainerService, Service, docker_engine_problem, mask

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve().relative_to(ROOT)
NO_ENGINE = "unix:///nonexistent/docker.sock"


@contextmanager
def channel(url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    connection = pika.BlockingConnection(params)
    try:
        ch = connection.channel()
        ch.confirm_delivery()  # publishes return once the broker has the message
        yield ch
    finally:
        if connection.is_open:
            connection.close()


def queue_depth(url: str, queue: str) -> int:
    with channel(url) as ch:
        depth: int = ch.queue_declare(queue, passive=True).method.message_count
        return depth


def container_of(service: Service) -> ContainerService:
    if not isinstance(service, ContainerService):
        pytest.skip(f"needs the container backend (this session uses {service.backend})")
    return service


def mapped_port(service: ContainerService, port: int) -> int:
    wrapped = service._docker()
    wrapped.reload()
    return int(wrapped.ports[f"{port}/tcp"][0]["HostPort"])


def run_pytest(test: str, **env: str) -> subprocess.CompletedProcess[str]:
    """This file's ``test`` in a child pytest session with ``env`` on top of ours."""
    child_env = {k: v for k, v in os.environ.items() if k != "CI"} | env
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"{THIS}::{test}"],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_vhosts_are_isolated(new_vhost: Callable[[], str], rabbitmq_broker: Broker) -> None:
    first, second = new_vhost(), new_vhost()
    assert first != second
    assert urlsplit(first).port == urlsplit(rabbitmq_broker.admin_url).port
    with channel(first) as ch:
        ch.queue_declare("ew.isolation", durable=True)
        ch.basic_publish("", "ew.isolation", b"only here")
    assert queue_depth(first, "ew.isolation") == 1
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as missing:
        queue_depth(second, "ew.isolation")
    assert missing.value.reply_code == 404


def test_databases_are_isolated(new_database: Callable[[], str], postgres_server: Service) -> None:
    first, second = new_database(), new_database()
    assert urlsplit(first).path != urlsplit(second).path
    assert urlsplit(first).port == urlsplit(postgres_server.admin_url).port
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE marker (id int)")
        conn.execute("INSERT INTO marker VALUES (1)")
    with psycopg.connect(second) as conn:
        assert conn.execute("SELECT to_regclass('marker')").fetchone() == (None,)
    with psycopg.connect(first) as conn:
        assert conn.execute("SELECT id FROM marker").fetchall() == [(1,)]


def test_session_fixtures_are_usable(database_url: str, rabbitmq_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (
            urlsplit(database_url).path[1:],
        )
    with channel(rabbitmq_url) as ch:
        assert ch.is_open


def test_broker_stop_and_start_keep_the_url_and_durable_messages(
    new_vhost: Callable[[], str], rabbitmq_broker: Broker
) -> None:
    broker = container_of(rabbitmq_broker)
    url = new_vhost()
    admin_url = broker.admin_url
    with channel(url) as ch:
        ch.queue_declare("ew.durable", durable=True)
        ch.basic_publish("", "ew.durable", b"kept", pika.BasicProperties(delivery_mode=2))
    broker.stop()
    assert broker.status() == "exited"
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        queue_depth(url, "ew.durable")
    broker.start()
    assert broker.admin_url == admin_url
    assert mapped_port(broker, 5672) == broker.host_port
    assert queue_depth(url, "ew.durable") == 1


def test_a_killed_broker_comes_back_on_the_same_port(
    new_vhost: Callable[[], str], rabbitmq_broker: Broker
) -> None:
    broker = container_of(rabbitmq_broker)
    url = new_vhost()
    broker.kill()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        queue_depth(url, "ew.any")
    broker.start()
    assert mapped_port(broker, 5672) == urlsplit(url).port
    with channel(url) as ch:
        ch.queue_declare("ew.after-kill")
        ch.basic_publish("", "ew.after-kill", b"x")
    assert queue_depth(url, "ew.after-kill") == 1


def test_postgres_data_survives_a_pause(
    new_database: Callable[[], str], postgres_server: Service
) -> None:
    server = container_of(postgres_server)
    url = new_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before the pause')")
    server.pause()
    try:
        assert server.status() == "paused"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=1).close()
    finally:
        server.unpause()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before the pause",)]


def test_postgres_unavailable_for_a_while_then_back_with_its_data(
    new_database: Callable[[], str], postgres_server: Service
) -> None:
    server = container_of(postgres_server)
    url = new_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    restored = server.unavailable_for(1.0)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=1).close()
    restored.join(timeout=120)
    assert not restored.is_alive()
    assert mapped_port(server, 5432) == urlsplit(url).port
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [(42,)]


def test_rabbitmqctl_on_path_reaches_the_session_broker(rabbitmq_url: str) -> None:
    vhost = urlsplit(rabbitmq_url).path[1:]
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert vhost in listed.stdout.split()


def test_no_password_in_reprs(rabbitmq_broker: Broker, postgres_server: Service) -> None:
    for service in (rabbitmq_broker, postgres_server):
        password = urlsplit(service.admin_url).password
        if service.backend == "container":
            assert password, "containers get a random password per session"
        if password:
            assert f":{password}@" not in repr(service)
            assert ":***@" in repr(service)


def test_mask_hides_only_the_password() -> None:
    assert mask("amqp://ew:s3cr%2Ft@127.0.0.1:5672/%2F") == "amqp://ew:***@127.0.0.1:5672/%2F"
    assert mask("postgresql://postgres@h/db") == "postgresql://postgres@h/db"


def test_an_absent_engine_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    problem = docker_engine_problem()
    assert problem is not None
    assert problem.startswith("no Docker engine answers")


def test_without_an_engine_the_session_falls_back_loudly() -> None:
    child = run_pytest("test_session_fixtures_are_usable", DOCKER_HOST=NO_ENGINE)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "services: WARNING no Docker engine answers" in child.stdout  # the header
    assert "test services: fallback to the machine's own" in child.stdout  # the summary
    assert "WARNING no Docker engine answers" in child.stdout.split("fallback to the")[1]


def test_with_ci_a_missing_engine_fails_the_session() -> None:
    child = run_pytest("test_mask_hides_only_the_password", DOCKER_HOST=NO_ENGINE, CI="true")
    assert child.returncode != 0
    assert "CI=true: the test services must run in containers" in child.stderr


def test_with_ci_an_image_that_cannot_start_fails_instead_of_falling_back() -> None:
    if docker_engine_problem() is not None:
        pytest.skip("needs a Docker engine")
    missing = "ew-test/no-such-image:0"
    child = run_pytest(
        "test_session_fixtures_are_usable",
        CI="true",
        RABBITMQ_IMAGE=missing,
        POSTGRES_IMAGE=missing,
    )
    assert child.returncode != 0
    assert "CI=true requires containers" in child.stdout


def test_an_image_that_cannot_start_falls_back_loudly() -> None:
    if docker_engine_problem() is not None:
        pytest.skip("needs a Docker engine")
    missing = "ew-test/no-such-image:0"
    child = run_pytest(
        "test_session_fixtures_are_usable", RABBITMQ_IMAGE=missing, POSTGRES_IMAGE=missing
    )
    assert child.returncode == 0, child.stdout + child.stderr
    assert f"rabbitmq container ({missing}) did not start" in child.stdout
    assert f"postgres container ({missing}) did not start" in child.stdout


def test_postgres_takes_any_password_like_the_machines_own(database_url: str) -> None:
    """Other tests put a made-up password in a URL to check it is never printed."""
    parts = urlsplit(database_url)
    other = parts._replace(netloc=f"{parts.username}:made-up@{parts.hostname}:{parts.port}")
    with psycopg.connect(urlunsplit(other)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
