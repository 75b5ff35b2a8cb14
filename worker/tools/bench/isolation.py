"""The bench's own vhost and database, made for one run and removed after it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

from worker.config import mask_url
from worker.tools.bench.counts import BenchError


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise BenchError(f"rabbitmqctl {args[0]} failed: {' '.join(last)}")


@contextlib.contextmanager
def isolated_vhost(admin_url: str, given_url: str | None) -> Iterator[str]:
    """A vhost of the bench's own: created and deleted with rabbitmqctl, or ``--vhost-url``."""
    if given_url:
        yield given_url
        return
    if shutil.which("rabbitmqctl") is None:
        raise BenchError(
            "rabbitmqctl is not available to create the bench's own vhost; "
            "pass --vhost-url with the URL of an empty vhost reserved for the bench"
        )
    name = f"ew_bench_{uuid.uuid4().hex[:10]}"
    user = urlsplit(admin_url).username or "guest"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield _with_path(admin_url, "/" + quote(name, safe=""))
    finally:
        with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
            _rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def isolated_database(admin_url: str) -> Iterator[str]:
    """A database of the bench's own, dropped at the end."""
    name = f"ew_bench_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise BenchError(
            f"cannot create the bench database at {mask_url(admin_url)}: {type(exc).__name__}"
        ) from None
    try:
        yield _with_path(admin_url, f"/{name}")
    finally:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(admin_url, autocommit=True) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
