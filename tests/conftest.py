"""Shared fixtures: isolated PostgreSQL databases and RabbitMQ virtual hosts.

Every test session gets its own database and vhost, so several test runs (and several
developers' helpers) can share the machine's RabbitMQ and PostgreSQL without seeing each
other's queues or rows. ``new_database()`` / ``new_vhost()`` make more for tests that need a
pristine one.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

ADMIN_DATABASE_URL = os.environ.get(
    "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ADMIN_RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def new_database() -> Iterator[Callable[[], str]]:
    created: list[str] = []

    def make() -> str:
        name = f"ew_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _with_path(ADMIN_DATABASE_URL, f"/{name}")

    yield make
    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def new_vhost() -> Iterator[Callable[[], str]]:
    created: list[str] = []
    user = urlsplit(ADMIN_RABBITMQ_URL).username or "guest"

    def make() -> str:
        name = f"ew_test_{uuid.uuid4().hex[:12]}"
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        created.append(name)
        return _with_path(ADMIN_RABBITMQ_URL, "/" + quote(name, safe=""))

    yield make
    for name in created:
        try:
            _rabbitmqctl("delete_vhost", name)
        except subprocess.SubprocessError:
            pass


@pytest.fixture(scope="session")
def database_url(new_database: Callable[[], str]) -> str:
    """A database of this test session's own (empty, not migrated)."""
    return new_database()


@pytest.fixture(scope="session")
def rabbitmq_url(new_vhost: Callable[[], str]) -> str:
    """A RabbitMQ vhost of this test session's own."""
    return new_vhost()
