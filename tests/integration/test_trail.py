"""`execution-worker trail KEY` against a real, migrated PostgreSQL database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.types.json import Jsonb

from worker.cli import main as cli_main
from worker.observability.logs import forget_secrets
from worker.store.migrate import apply_migrations

pytestmark = pytest.mark.integration

# PostgreSQL here trusts local connections, so a password in the URL is accepted and unused:
# it lets us check that the database password never reaches the output.
DB_PASSWORD = "Db-Pass-7f3a9c"
T0 = datetime(2026, 11, 25, 10, 0, 0, 123000, tzinfo=UTC)


def ms(offset: float) -> datetime:
    return T0 + timedelta(milliseconds=offset)


def _insert_execution(conn: psycopg.Connection[Any], **row: Any) -> None:
    columns = ", ".join(row)
    values = ", ".join(f"%({name})s" for name in row)
    conn.execute(f"INSERT INTO execution.executions ({columns}) VALUES ({values})", row)


def _event(conn: psycopg.Connection[Any], execution_id: uuid.UUID, **event: Any) -> None:
    event.setdefault("detail", None)
    if event["detail"] is not None:
        event["detail"] = Jsonb(event["detail"])
    columns = ", ".join(["execution_id", *event])
    values = ", ".join(["%(execution_id)s", *(f"%({name})s" for name in event)])
    conn.execute(
        f"INSERT INTO execution.execution_events ({columns}) VALUES ({values})",
        {"execution_id": execution_id, **event},
    )


@pytest.fixture(scope="module")
def populated(new_database: Callable[[], str]) -> dict[str, Any]:
    url = new_database()
    filled = uuid.uuid5(uuid.NAMESPACE_URL, "rpm-order-filled")
    rejected = uuid.uuid5(uuid.NAMESPACE_URL, "rpm-order-rejected")
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
        _insert_execution(
            conn,
            execution_id=filled,
            idempotency_key="idem-filled-1",
            rpm_order_id="rpm-order-filled",
            state="FILLED",
            symbol="EURUSD",
            broker_symbol="EURUSD.a",
            direction=1,
            intended_units=95000.0,
            intended_lots=0.95,
            executed_units=95000.0,
            executed_lots=0.95,
            requested_price=1.08412,
            fill_price=1.08415,
            spread_pips=0.8,
            slippage_pips=0.3,
            deviation_points=20,
            filling_mode=0,
            comment_token="EW-ab12cd34ef56",
            magic=26112501,
            session_id="sim-1",
            account_login=5001,
            broker_order=777001,
            broker_deals=[888001],
            broker_position=777001,
            retcode=10009,
            broker_comment="Request executed",
            attempts=2,
            request=Jsonb({"decision": {"order_id": "rpm-order-filled"}}),
            received_at=ms(0),
            submitted_at=ms(4),
            completed_at=ms(9),
        )
        steps = [
            (0.0, "receive", "transition", "RECEIVED", None, None, None, None),
            (1.0, "validate", "transition", "VALIDATED", None, None, None, {"spread_pips": 0.8}),
            (2.0, "intent", "transition", "SUBMITTING", None, None, None, None),
            (3.0, "submit", "broker_call", None, "order_send", 10004, 1.25, {"price": 1.0841}),
            (5.0, "submit", "broker_call", None, "order_send", 10009, 0.75, {"deal": 888001}),
            (
                6.0,
                "slippage",
                "note",
                None,
                None,
                None,
                None,
                # a careless note with a connection string: must come out masked
                {"via": f"amqp://worker:{DB_PASSWORD}@mq/%2F", "pw": DB_PASSWORD},
            ),
            (8.0, "commit", "transition", "FILLED", None, None, None, None),
        ]
        for offset, stage, kind, state, function, retcode, latency, detail in steps:
            _event(
                conn,
                filled,
                at=ms(offset),
                stage=stage,
                kind=kind,
                state=state,
                function=function,
                retcode=retcode,
                latency_ms=latency,
                detail=detail,
            )
        conn.execute(
            "INSERT INTO execution.outbox (execution_id, routing_key, payload, correlation_id,"
            " reply_to, created_at, published_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                filled,
                "confirmation.filled.EURUSD",
                json.dumps({"status": "FILLED", "execution_id": str(filled)}),
                "rpm-order-filled",
                "rpm.replies",
                ms(8),
                ms(11),
            ),
        )
        _insert_execution(
            conn,
            execution_id=rejected,
            idempotency_key="msg-id-rejected",
            rpm_order_id=None,
            state="REJECTED",
            rejection_reason="SPREAD_TOO_WIDE",
            rejection_details="spread 4.2 pips > limit 3.0",
            symbol="GBPUSD",
            comment_token="EW-99aa88bb77cc",
            received_at=ms(100),
            completed_at=ms(102),
        )
        _event(conn, rejected, at=ms(101), stage="validate", kind="transition", state="REJECTED")
        conn.execute(
            "INSERT INTO execution.outbox (execution_id, routing_key, payload, created_at)"
            " VALUES (%s, %s, %s, now() - interval '30 seconds')",
            (rejected, "confirmation.rejected.GBPUSD", "{}"),
        )
    parts = urlsplit(url)
    with_password = parts._replace(
        netloc=f"{parts.username}:{DB_PASSWORD}@{parts.hostname}:{parts.port}"
    )
    return {"url": urlunsplit(with_password), "filled": filled, "rejected": rejected}


def run_trail(
    populated: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    url: str | None = None,
) -> tuple[int, str, str]:
    monkeypatch.setenv("DATABASE_URL", url or populated["url"])
    monkeypatch.delenv("WORKER_CONFIG", raising=False)
    try:
        code = cli_main(["trail", *args])
    finally:
        forget_secrets()
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "key", ["rpm-order-filled", "idem-filled-1", "FILLED_ID", "EW-ab12cd34ef56", "777001"]
)
def test_every_key_finds_the_execution_and_prints_its_timeline(
    key: str,
    populated: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if key == "FILLED_ID":
        key = str(populated["filled"])
    code, out, err = run_trail(populated, monkeypatch, capsys, key)
    assert code == 0, err
    assert f"Execution {populated['filled']}  FILLED" in out
    assert "EURUSD (broker EURUSD.a) BUY" in out
    assert "95000 units = 0.95 lots" in out
    assert "slippage 0.3 pips" in out
    assert "completed at" in out and "(+9.0 ms)" in out
    timeline = out.split("Timeline (7 events)")[1].split("Outbox")[0]
    stages = [line.split()[2] for line in timeline.strip().splitlines()[2:]]
    assert stages == ["receive", "validate", "intent", "submit", "submit", "slippage", "commit"]
    requote = next(line for line in timeline.splitlines() if "10004" in line)
    assert "order_send" in requote and "1.25" in requote and requote.strip().startswith("+3.0")
    assert "published at 2026-11-25T10:00:00.134Z" in out
    assert "GBPUSD" not in out


def test_json_output_has_row_events_and_outbox(
    populated: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_trail(populated, monkeypatch, capsys, "msg-id-rejected", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["key"] == "msg-id-rejected"
    [entry] = document["executions"]
    assert entry["execution"]["execution_id"] == str(populated["rejected"])
    assert entry["execution"]["rejection_reason"] == "SPREAD_TOO_WIDE"
    assert [e["state"] for e in entry["events"]] == ["REJECTED"]
    assert entry["outbox"]["state"] == "pending"
    assert entry["outbox"]["routing_key"] == "confirmation.rejected.GBPUSD"


def test_pending_outbox_is_shown_with_its_age(
    populated: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_trail(populated, monkeypatch, capsys, str(populated["rejected"]))
    assert code == 0
    assert "rejection        SPREAD_TOO_WIDE: spread 4.2 pips > limit 3.0" in out
    assert "PENDING, not confirmed by RabbitMQ for" in out


def test_unknown_key_exits_1_with_a_clear_message(
    populated: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_trail(populated, monkeypatch, capsys, "no-such-order")
    assert code == 1
    assert out == ""
    assert "no execution found for 'no-such-order'" in err


def test_output_and_errors_never_show_the_database_password(
    populated: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (("rpm-order-filled",), ("rpm-order-filled", "--json")):
        code, out, err = run_trail(populated, monkeypatch, capsys, *args)
        assert code == 0
        assert DB_PASSWORD not in out + err
        assert "amqp://worker:***@mq/%2F" in out
    unreachable = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:1/nothing"
    code, out, err = run_trail(populated, monkeypatch, capsys, "x", url=unreachable)
    assert code == 5  # ExitCode.DATABASE_UNREACHABLE
    assert DB_PASSWORD not in out + err
    assert "postgresql://postgres:***@127.0.0.1:1/nothing" in err


def test_unmigrated_database_says_to_migrate(
    new_database: Callable[[], str],
    populated: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_trail(populated, monkeypatch, capsys, "x", url=new_database())
    assert code == 5  # ExitCode.DATABASE_UNREACHABLE
    assert "execution-worker migrate" in err
