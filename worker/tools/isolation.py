"""A RabbitMQ vhost and a PostgreSQL database of a command's own, created and dropped.

``demo`` and ``bench`` run here so that they never consume another worker's
``execution.requests`` or write into its audit store. The vhost is made with ``rabbitmqctl``
when the broker is this machine's and the tool is installed, else through the management
HTTP API (``RABBITMQ_MANAGEMENT_URL``, default ``http://HOST:15672`` of ``RABBITMQ_URL``),
with the user of ``RABBITMQ_URL``; the database with ``CREATE DATABASE`` as the role of
``DATABASE_URL``. Both are removed when the command ends, whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import psycopg
import psycopg.errors

from worker.config import mask_url
from worker.errors import ExitCode, WorkerError

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
MANAGEMENT_PORT = 15672


class IsolationError(WorkerError):
    """The vhost or database of the command's own could not be made; one line."""

    def __init__(self, message: str, exit_code: int = ExitCode.CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:]) or "/"


def new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# ----------------------------------------------------------------------------- RabbitMQ


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise IsolationError(f"rabbitmqctl {args[0]} failed: {' '.join(last)}")


def _management_url(amqp_url: str) -> str:
    given = os.environ.get("RABBITMQ_MANAGEMENT_URL")
    if given:
        return given.rstrip("/")
    host = urlsplit(amqp_url).hostname or "127.0.0.1"
    return f"http://{host}:{MANAGEMENT_PORT}"


def _management(amqp_url: str, method: str, path: str, body: object | None = None) -> None:
    parts = urlsplit(amqp_url)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(
        _management_url(amqp_url) + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def _uses_rabbitmqctl(amqp_url: str) -> bool:
    return (urlsplit(amqp_url).hostname or "") in LOOPBACK and shutil.which(
        "rabbitmqctl"
    ) is not None


def create_vhost(amqp_url: str, name: str) -> str:
    """Create ``name`` and give the user of ``amqp_url`` every permission in it; its URL.

    ``rabbitmqctl`` first for a broker on this machine, else (or when it fails: another
    user than root or rabbitmq) the management API; IsolationError naming both otherwise."""
    user = unquote(urlsplit(amqp_url).username or "guest")
    problems: list[str] = []
    if _uses_rabbitmqctl(amqp_url):
        try:
            _rabbitmqctl("add_vhost", name)
            _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
            return with_path(amqp_url, "/" + quote(name, safe=""))
        except (IsolationError, OSError, subprocess.SubprocessError) as exc:
            problems.append(str(exc))
    vhost = quote(name, safe="")
    try:
        _management(amqp_url, "PUT", f"/api/vhosts/{vhost}")
        _management(
            amqp_url,
            "PUT",
            f"/api/permissions/{vhost}/{quote(user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
    except (urllib.error.URLError, OSError) as exc:
        problems.append(
            f"the management API at {_management_url(amqp_url)}: {getattr(exc, 'reason', exc)}"
        )
        raise IsolationError(
            f"cannot create a vhost of its own at {mask_url(amqp_url)} ({'; '.join(problems)});"
            " enable the management plugin or set RABBITMQ_MANAGEMENT_URL, or give --vhost-url"
            " (an empty vhost), or --in-place (the vhost of RABBITMQ_URL as it is)"
        ) from None
    return with_path(amqp_url, "/" + quote(name, safe=""))


def delete_vhost(amqp_url: str, name: str) -> None:
    """Best effort, the way it was made (rabbitmqctl, else the management API)."""
    if _uses_rabbitmqctl(amqp_url):
        with contextlib.suppress(IsolationError, OSError, subprocess.SubprocessError):
            _rabbitmqctl("delete_vhost", name)
            return
    with contextlib.suppress(urllib.error.URLError, OSError):
        _management(amqp_url, "DELETE", f"/api/vhosts/{quote(name, safe='')}")


@contextlib.contextmanager
def own_vhost(amqp_url: str, prefix: str) -> Iterator[str]:
    """A new vhost (on the broker of ``amqp_url``), deleted at the end; yields its URL."""
    name = new_name(prefix)
    url = create_vhost(amqp_url, name)
    try:
        yield url
    finally:
        delete_vhost(amqp_url, name)


# ----------------------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def own_database(database_url: str, prefix: str) -> Iterator[str]:
    """A new database (on the server of ``database_url``), dropped at the end; its URL."""
    from worker.explain import describe_database_error

    name = new_name(prefix)
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        explained = describe_database_error(exc, database_url)
        hint = (
            " (the role of DATABASE_URL needs CREATEDB; or --in-place: its database as it is)"
            if isinstance(exc, psycopg.errors.InsufficientPrivilege)
            else ""
        )
        raise IsolationError(
            f"cannot create a database of its own: {explained.line}{hint}", explained.code
        ) from None
    try:
        yield with_path(database_url, f"/{name}")
    finally:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
