"""Log lines carry the message context and never a password or registered secret."""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from worker.config import load_settings
from worker.observability.logs import (
    configure_logging,
    current_context,
    forget_secrets,
    log_context,
    redact,
    register_secret,
    register_settings_secrets,
)

BROKER_PASSWORD = "s3cr3t-Br0ker/pass"  # '/' is quoted in a URL: both forms must go
DB_PASSWORD = "pg'Pa ss\"word"  # a quote and a space: breaks naive URL matching
MT5_PASSWORD = "Mt5AccountPw!42"
BRIDGE_SECRET = "bridge-shared-secret-0123456789"
SECRETS = (BROKER_PASSWORD, DB_PASSWORD, MT5_PASSWORD, BRIDGE_SECRET, "s3cr3t-Br0ker%2Fpass")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = configure_logging("json", "DEBUG", stream=buffer)
    yield buffer
    logging.getLogger().removeHandler(handler)
    forget_secrets()


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_the_context_and_nest(stream: io.StringIO) -> None:
    log = logging.getLogger("worker.execution.pipeline")
    with log_context(execution_id="e-1", order_id="o-1", symbol="EURUSD", session=None):
        with log_context(stage="submit", session="sim-2"):
            log.info("sending %s lots", 0.95, extra={"retcode": 10009})
        log.warning("after the stage")
    log.info("outside")

    first, second, third = lines(stream)
    assert first["message"] == "sending 0.95 lots"
    assert first["level"] == "INFO" and first["logger"] == "worker.execution.pipeline"
    assert first["execution_id"] == "e-1" and first["order_id"] == "o-1"
    assert first["stage"] == "submit" and first["session"] == "sim-2"
    assert first["retcode"] == 10009
    assert str(first["ts"]).endswith("Z")
    assert "stage" not in second and second["symbol"] == "EURUSD"
    assert "execution_id" not in third
    assert current_context() == {}


def test_context_does_not_leak_into_another_thread(stream: io.StringIO) -> None:
    seen: list[dict[str, str]] = []
    with log_context(execution_id="e-2"):
        thread = threading.Thread(target=lambda: seen.append(current_context()))
        thread.start()
        thread.join()
    assert seen == [{}]


def test_secrets_never_reach_the_output(stream: io.StringIO) -> None:
    settings = load_settings(
        {
            "RABBITMQ_URL": f"amqp://worker:{BROKER_PASSWORD.replace('/', '%2F')}@mq:5672/%2F",
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/postgres",
            "MT5_BRIDGE_SECRET": BRIDGE_SECRET,
        }
    )
    register_settings_secrets(settings)
    register_secret(SecretStr(MT5_PASSWORD))
    register_secret(DB_PASSWORD)
    log = logging.getLogger("worker.amqp.runtime")
    db_url = f"postgresql://app:{DB_PASSWORD}@db:5432/execution"

    log.error("connect failed to %s", settings.rabbitmq_url.get_secret_value())
    log.error("database %s unreachable", db_url)
    log.info("dsn host=db user=app password=%s dbname=x", DB_PASSWORD)
    log.info("login", extra={"mt5_password": MT5_PASSWORD, "params": {"secret": BRIDGE_SECRET}})
    try:
        raise ConnectionError(f"bridge auth with {BRIDGE_SECRET} to amqp://u:{MT5_PASSWORD}@h/")
    except ConnectionError:
        log.exception("bridge down")
    log.warning("bad format %s %s", MT5_PASSWORD)  # wrong argument count must not leak either
    log.info(f"settings: {settings!r} raw {MT5_PASSWORD}")

    output = stream.getvalue()
    for secret in SECRETS:
        assert secret not in output, secret
    assert json.dumps(DB_PASSWORD)[1:-1] not in output
    records = lines(stream)
    assert len(records) == 7
    assert "amqp://worker:***@mq:5672/%2F" in str(records[0]["message"])
    assert "postgresql://app:***@db:5432/execution" in str(records[1]["message"])
    assert records[3]["mt5_password"] == "***"
    assert "bridge down" in str(records[4]["message"]) and "ConnectionError" in str(
        records[4]["exc"]
    )


def test_console_format_redacts_too() -> None:
    buffer = io.StringIO()
    handler = configure_logging("console", "INFO", stream=buffer)
    try:
        register_secret(MT5_PASSWORD)
        with log_context(symbol="USDJPY"):
            logging.getLogger("worker.pool").warning("login %s failed", MT5_PASSWORD)
        logging.getLogger("worker.pool").debug("below the level")
    finally:
        logging.getLogger().removeHandler(handler)
        forget_secrets()
    text = buffer.getvalue()
    assert MT5_PASSWORD not in text
    assert "WARNING" in text and "login *** failed" in text and "symbol=USDJPY" in text
    assert "below the level" not in text


def test_configure_twice_keeps_one_handler() -> None:
    first = configure_logging("json", "INFO", stream=io.StringIO())
    second = configure_logging("json", "INFO", stream=io.StringIO())
    try:
        assert first not in logging.getLogger().handlers
        assert second in logging.getLogger().handlers
    finally:
        logging.getLogger().removeHandler(second)


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "EURUSD filled 0.95 lots at 1.08412, url amqp://guest@127.0.0.1:5672/%2F"
    assert redact(text) == text
    register_secret("ab")  # too short to mask safely: ignored rather than mangling text
    try:
        assert redact("abc") == "abc"
    finally:
        forget_secrets()


def test_log_context_nests_skips_none_and_restores_after_an_error() -> None:
    assert current_context() == {}
    with log_context(execution_id=uuid.UUID(int=1), symbol=None):
        assert current_context() == {"execution_id": str(uuid.UUID(int=1))}
        with pytest.raises(RuntimeError), log_context(session="sim-0", execution_id="x"):
            assert current_context() == {"execution_id": "x", "session": "sim-0"}
            raise RuntimeError
        assert current_context() == {"execution_id": str(uuid.UUID(int=1))}
    assert current_context() == {}


def test_console_lines_name_the_process_and_its_worker_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging
    import os

    from worker.observability.logs import WORKER_INDEX_ENV, ConsoleFormatter

    record = logging.LogRecord("worker.executions", logging.INFO, __file__, 1, "hello", (), None)
    monkeypatch.delenv(WORKER_INDEX_ENV, raising=False)
    assert f"[pid {os.getpid()}] worker.executions: hello" in ConsoleFormatter().format(record)
    monkeypatch.setenv(WORKER_INDEX_ENV, "1")
    assert f"[w1/{os.getpid()}] worker.executions: hello" in ConsoleFormatter().format(record)


def test_a_finished_execution_is_one_line_with_status_symbol_lots_and_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json
    import logging
    import uuid
    from datetime import UTC, datetime, timedelta

    from worker.amqp.finished import log_finished
    from worker.execution.outcome import Publish

    execution_id = uuid.UUID("3f0c9a1e-0000-4000-8000-000000000000")
    payload = json.dumps({"status": "FILLED", "executed_lots": 1.86}).encode()
    publish = Publish(execution_id, "confirmation.filled.EURUSD", payload, "o-1", None)
    with caplog.at_level(logging.INFO, logger="worker.executions"):
        log_finished(publish, datetime.now(UTC) - timedelta(seconds=2), redelivered=False)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "worker.executions"]
    assert line.startswith("execution 3f0c9a1e FILLED EURUSD 1.86 lots in ")
    assert int(line.split(" in ")[1].split()[0]) >= 2000


def test_the_per_execution_line_is_for_the_console() -> None:
    import io
    import logging

    from worker.observability.logs import EXECUTIONS_LOGGER, configure_logging

    executions = logging.getLogger(EXECUTIONS_LOGGER)
    try:
        configure_logging("json", "INFO", stream=io.StringIO())
        assert not executions.isEnabledFor(logging.INFO)
        configure_logging("json", "DEBUG", stream=io.StringIO())
        assert executions.isEnabledFor(logging.INFO)
        configure_logging("console", "INFO", stream=io.StringIO())
        assert executions.isEnabledFor(logging.INFO)
    finally:
        configure_logging("json", "INFO", stream=io.StringIO())
        executions.setLevel(logging.NOTSET)
        logging.getLogger().setLevel(logging.WARNING)
