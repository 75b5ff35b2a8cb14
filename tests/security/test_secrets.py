"""Secrets never leave: passwords in RABBITMQ_URL / DATABASE_URL / MT5_BRIDGE_SECRET (from the
environment or from ``*_FILE`` secret files) appear in no repr, log line, error, metric or
trail output, while the worker fails in every way we can provoke: a database that is not
there, a broker that refuses the password, a bridge that refuses the secret.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from prometheus_client import REGISTRY, generate_latest

from tests.integration.test_bridge_helpers import address_of, open_config, served
from worker.amqp.runtime import runtime_from_settings
from worker.config import load_settings
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal
from worker.mt5.sim.terminal import SimTerminal
from worker.observability.health import database_check
from worker.observability.logs import configure_logging, forget_secrets, register_settings_secrets

DB_PASSWORD = "Db-" + uuid.uuid4().hex
MQ_PASSWORD = "Mq-" + uuid.uuid4().hex
BRIDGE_SECRET = "Br-" + uuid.uuid4().hex
SECRETS = (DB_PASSWORD, MQ_PASSWORD, BRIDGE_SECRET)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_password(url: str, password: str, port: int | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or "guest"
    netloc = f"{user}:{password}@{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret leaked into {where}: {text[:500]}"


@pytest.fixture
def environ(tmp_path: Path, rabbitmq_url: str, database_url: str) -> dict[str, str]:
    """Secrets from files (Docker/Kubernetes secrets), as ``*_FILE`` variables."""
    files = {}
    for name, value in (
        ("RABBITMQ_URL", with_password(rabbitmq_url, MQ_PASSWORD)),  # wrong: refused
        ("DATABASE_URL", with_password(database_url, DB_PASSWORD, closed_port())),  # no server
        ("MT5_BRIDGE_SECRET", BRIDGE_SECRET),
    ):
        path = tmp_path / name.lower()
        path.write_text(value + "\n")
        path.chmod(0o600)
        files[f"{name}_FILE"] = str(path)
    return {**files, "METRICS_PORT": "0", "LOG_FORMAT": "json"}


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "DEBUG", stream=stream)
    try:
        yield stream
    finally:
        forget_secrets()
        configure_logging("console", "WARNING", stream=sys.stderr)


def test_settings_reprs_never_show_secrets(environ: dict[str, str]) -> None:
    settings = load_settings(environ)
    assert settings.mt5_bridge_secret is not None
    assert settings.mt5_bridge_secret.get_secret_value() == BRIDGE_SECRET  # read from the file
    for text in (repr(settings), str(settings), str(settings.public()), f"{settings!r}"):
        assert_clean(text, "the settings' repr")
    assert_clean(settings.model_dump_json(), "the settings' JSON")


def test_failures_in_process_leak_nothing(
    environ: dict[str, str], captured: io.StringIO, rabbitmq_url: str
) -> None:
    settings = load_settings(environ)
    register_settings_secrets(settings)
    log = logging.getLogger("worker.test_secrets")
    texts: list[tuple[str, str]] = []

    # 1. a database that is not there (readiness check, and a direct connect's error; the
    # pool in Service.start fails the same way, after its 30 s wait: see the CLI test)
    url = settings.database_url.get_secret_value()
    assert database_check(url, timeout=2.0)() is False
    with pytest.raises(psycopg.OperationalError) as failed_db:
        psycopg.connect(url, connect_timeout=2)
    texts.append(("the database error", f"{failed_db.value!r} {failed_db.value}"))
    log.error("cannot start: %s", failed_db.value, exc_info=failed_db.value)

    # 2. a broker that refuses the password (the real broker)
    runtime = runtime_from_settings(settings, lambda d: None, _NoOutbox(), 1)  # type: ignore[arg-type,return-value]
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runtime.run()))
    thread.start()
    thread.join(60)
    assert result == [77], "the broker should refuse the wrong password"
    texts.append(("the runtime error", str(runtime.error)))
    assert "***" in str(runtime.error)

    # 3. a bridge that does not know our secret
    sim = SimTerminal(open_config())
    assert sim.initialize()
    with served(sim, "another-secret-" + uuid.uuid4().hex, handshake_timeout=1.0) as server:
        assert settings.mt5_bridge_secret is not None
        terminal = BridgeTerminal(address_of(server), settings.mt5_bridge_secret)
        assert terminal.initialize() is False
        with pytest.raises(api.TransportError) as bridge_error:
            terminal.terminal_info()
        texts.append(("the bridge error", f"{bridge_error.value!r} {bridge_error.value}"))
        texts.append(("the bridge terminal", f"{terminal!r} {terminal.last_error()}"))
        log.error("bridge: %s", bridge_error.value)

    log.error("with the settings: %s / %r", settings, settings)
    log.error("raw URL in a message: %s", settings.rabbitmq_url.get_secret_value())
    texts.append(("the log", captured.getvalue()))
    texts.append(("/metrics", generate_latest(REGISTRY).decode()))
    for where, text in texts:
        assert_clean(text, where)
    assert "Access" in captured.getvalue() or "refused" in captured.getvalue()


class _NoOutbox:
    def unpublished(self, limit: int) -> list[object]:
        return []

    def mark_published(self, execution_ids: object) -> None:
        pass


def _cli(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ", "DATABASE"))}
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (("run",), "database"),  # the database is fine, the broker refuses the password
        (("trail", "some-key"), None),
        (("trail", "some-key", "--json"), None),
        (("migrate",), None),
        (("retention", "--older-than", "90d"), None),
    ],
    ids=["run-refused-broker", "trail", "trail-json", "migrate", "retention"],
)
def test_cli_failures_leak_nothing(
    environ: dict[str, str],
    database_url: str,
    args: tuple[str, ...],
    fix: str | None,
    tmp_path: Path,
) -> None:
    if fix == "database":
        good = tmp_path / "good_database_url"
        # trust authentication ignores the password; it must still never be printed
        good.write_text(with_password(database_url, DB_PASSWORD))
        environ = {**environ, "DATABASE_URL_FILE": str(good)}
    done = _cli(environ, *args)
    assert done.returncode != 0
    assert_clean(done.stdout + done.stderr, f"`execution-worker {' '.join(args)}`")
    assert "***" in done.stdout + done.stderr or "cannot" in done.stdout + done.stderr


def test_a_secret_file_that_cannot_be_read_is_named_not_shown(tmp_path: Path) -> None:
    from worker.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings({"MT5_BRIDGE_SECRET_FILE": str(tmp_path / "missing")})
    assert "MT5_BRIDGE_SECRET_FILE" in str(info.value)
