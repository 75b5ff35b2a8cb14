"""The audit store against a real PostgreSQL."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from schemas.identity import comment_token_for
from worker.execution.outcome import Publish
from worker.store.migrate import migrations
from worker.store.store import (
    Event,
    Store,
    StoreError,
    _events_json,
    _fast_json,
    _row_json,
    json_default,
)


@pytest.fixture
def store(new_database: Callable[[], str]) -> Iterator[Store]:
    opened = Store.open(new_database(), max_size=4)
    assert opened.migrate() == [version for version, _ in migrations()]
    yield opened
    opened.close()


def _fields(execution_id: uuid.UUID, state: str, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "execution_id": execution_id,
        "idempotency_key": f"key-{execution_id}",
        "state": state,
        "comment_token": comment_token_for(execution_id),
        "received_at": datetime.now(UTC),
        "symbol": "EURUSD",
        "request": {"symbol": "EURUSD", "units": 1000.0},
    }
    fields.update(extra)
    return fields


def _publish(execution_id: uuid.UUID, status: str = "filled") -> Publish:
    payload = f'{{"execution_id": "{execution_id}", "status": "{status}"}}'.encode()
    return Publish(execution_id, f"confirmation.{status}.EURUSD", payload, "rpm-1", None)


def test_migrations_are_idempotent(store: Store) -> None:
    assert store.migrate() == []
    assert store.migrate() == []


def test_intent_then_finish_keeps_one_row_and_one_outbox_entry(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn:
        assert store.insert_intent(conn, _fields(execution_id, "SUBMITTING"), [Event("intent")])
        assert not store.insert_intent(conn, _fields(execution_id, "SUBMITTING"), [])
        store.update_in_flight(
            conn, execution_id, {"state": "SUBMITTED", "broker_order": 7}, [Event("submit")]
        )
        assert [row.execution_id for row in store.in_flight(conn)] == [execution_id]
        assert store.in_flight(conn, idle_seconds=3600) == [], "recently touched rows are busy"
        confirmation = _publish(execution_id)
        kept = store.finish(
            conn,
            _fields(execution_id, "FILLED", executed_lots=0.01),
            [Event("commit")],
            confirmation,
        )
        assert kept == confirmation
        again = store.finish(
            conn, _fields(execution_id, "REJECTED"), [Event("commit")], _publish(execution_id, "x")
        )
        assert again == confirmation, "a terminal row is never overwritten"
        row = store.load(conn, execution_id)
        assert row is not None and row.state == "FILLED" and row.get("broker_order") == 7
        assert store.in_flight(conn) == []
        stages = [event["stage"] for event in store.events_of(conn, execution_id)]
        assert stages == ["intent", "submit", "commit"]
    assert store.unpublished(10) == [confirmation]
    store.mark_published([execution_id])
    assert store.unpublished(10) == []


def test_rejection_without_intent_inserts_the_row(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn:
        store.finish(
            conn, _fields(execution_id, "REJECTED"), [], _publish(execution_id), insert_only=True
        )
        row = store.load(conn, execution_id)
        assert row is not None and row.terminal
        assert store.confirmation_of(conn, execution_id) == _publish(execution_id)


def test_settling_needs_a_row_in_flight(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn, pytest.raises(StoreError):
        store.finish(conn, _fields(execution_id, "FILLED"), [], _publish(execution_id))
    with store.connection() as conn:
        assert store.load(conn, execution_id) is None
        assert store.unpublished(10) == []


def test_events_are_append_only(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn:
        store.insert_intent(conn, _fields(execution_id, "SUBMITTING"), [Event("intent")])
        for statement in (
            "UPDATE execution.execution_events SET stage = 'forged'",
            "DELETE FROM execution.execution_events",
            "TRUNCATE execution.execution_events",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert len(store.events_of(conn, execution_id)) == 1


def test_columns_and_events_keep_their_types_through_the_json_parameters(store: Store) -> None:
    execution_id = uuid.uuid4()
    at = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
    with store.connection() as conn:
        store.insert_intent(conn, _fields(execution_id, "SUBMITTING"), [])
        final = _fields(
            execution_id,
            "FILLED",
            broker_deals=[2**40 + 1, 7],
            broker_order=2**40,
            fill_price=1.0849999999999999,
            slippage_pips=float("nan"),
            spread_pips=float("inf"),
            requested_price=float("-inf"),
            direction=-1,
            rejection_details='quote "x" \\ \u00e9 \n',
            completed_at=at,
            request={"nested": {"list": [1, 2.5, None]}, "text": "\u00e9"},
        )
        event = Event(
            "commit",
            "broker_call",
            "FILLED",
            function="order_send",
            retcode=10009,
            latency_ms=0.25,
            detail={"request": {"volume": 0.1}},
            at=at,
        )
        store.finish(conn, final, [event], _publish(execution_id))
        row = store.load(conn, execution_id)
        events = store.events_of(conn, execution_id)
    assert row is not None
    assert row.get("broker_deals") == [2**40 + 1, 7] and row.get("broker_order") == 2**40
    assert row.get("fill_price") == 1.0849999999999999
    assert math.isnan(row.get("slippage_pips"))
    assert row.get("spread_pips") == float("inf") and row.get("requested_price") == float("-inf")
    assert row.get("direction") == -1
    assert row.get("rejection_details") == 'quote "x" \\ \u00e9 \n'
    assert row.get("completed_at") == at
    assert row.get("request") == {"nested": {"list": [1, 2.5, None]}, "text": "\u00e9"}
    assert row.get("attempts") == 0, "a column not written keeps its default"
    [stored] = events
    assert [stored[c] for c in ("stage", "kind", "state")] == ["commit", "broker_call", "FILLED"]
    assert [stored[c] for c in ("function", "retcode", "latency_ms")] == ["order_send", 10009, 0.25]
    assert stored["detail"] == {"request": {"volume": 0.1}} and stored["at"] == at


def test_a_failed_finish_commits_nothing(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn:
        store.insert_intent(conn, _fields(execution_id, "SUBMITTING"), [])
        bad = _fields(execution_id, "FILLED")
        with pytest.raises(psycopg.Error):
            store.finish(
                conn, bad, [Event("commit", detail={"x": 1})], _publish(execution_id, "\x00")
            )
        row = store.load(conn, execution_id)
        assert row is not None and row.state == "SUBMITTING"
        assert store.events_of(conn, execution_id) == []
    assert store.unpublished(10) == []


def test_insert_only_finish_never_touches_an_existing_row(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn:
        store.insert_intent(conn, _fields(execution_id, "SUBMITTING"), [])
        with pytest.raises(StoreError):
            store.finish(
                conn,
                _fields(execution_id, "REJECTED"),
                [],
                _publish(execution_id),
                insert_only=True,
            )
        row = store.load(conn, execution_id)
        assert row is not None and row.state == "SUBMITTING"


def _reference_json(value: Any, *, allow_nan: bool = True) -> str:
    """What the parameters were before pydantic-core encoded them (``json.dumps``)."""
    return json.dumps(value, default=json_default, allow_nan=allow_nan)


def test_the_json_parameters_mean_what_json_dumps_meant_to_postgresql(store: Store) -> None:
    """Row and events as PostgreSQL reads them: the same record from the fast encoder's text
    as from ``json.dumps``'s (timestamps with any offset, naive ones, UUIDs, big integers,
    floats, non-ASCII), and the fast encoder's text is what is sent (no fallback)."""
    execution_id = uuid.uuid4()
    at = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
    fields = _fields(
        execution_id,
        "FILLED",
        broker_deals=[2**40 + 1, 7],
        magic=(2**25 - 1) << 38 | 5,
        fill_price=1.0849999999999999,
        slippage_pips=-0.0,
        intended_units=1e16,
        spread_pips=1e-7,
        rejection_details='quote "x" \\ \u00e9 \n \u2028',
        completed_at=at.astimezone(timezone(timedelta(hours=-5, minutes=-30))),
        submitted_at=at,
        received_at=datetime(2026, 11, 25, 12, 0, 0),
        request={"nested": {"list": [1, 2.5, None, True]}, "text": "\u00e9", "at": None},
    )
    events = [
        Event("commit", "broker_call", "FILLED", function="f", retcode=1, latency_ms=0.25, at=at),
        Event("intent", detail={"id": execution_id, "x": [1e300, -1]}, at=at),
    ]
    assert _fast_json(fields) == _row_json(fields)
    assert _fast_json(json.loads(_events_json(events))) is not None
    with store.connection() as conn:
        same_row = conn.execute(
            "SELECT jsonb_populate_record(NULL::execution.executions, %s::jsonb)"
            " IS NOT DISTINCT FROM jsonb_populate_record(NULL::execution.executions, %s::jsonb)",
            (_row_json(fields), _reference_json(fields)),
        ).fetchone()
        assert same_row == (True,)
        records = (
            "SELECT array_agg(e) FROM jsonb_to_recordset(%s::jsonb) AS e(at timestamptz,"
            " stage text, kind text, state text, function text, retcode int,"
            " latency_ms float8, detail jsonb)"
        )
        fast = conn.execute(records, (_events_json(events),)).fetchone()
        reference_rows = [
            {
                "at": e.at,
                "stage": e.stage,
                "kind": e.kind,
                "state": e.state,
                "function": e.function,
                "retcode": e.retcode,
                "latency_ms": e.latency_ms,
                "detail": e.detail,
            }
            for e in events
        ]
        reference = conn.execute(records, (_reference_json(reference_rows),)).fetchone()
        assert fast is not None and fast == reference


def test_a_non_finite_float_keeps_its_json_dumps_handling() -> None:
    """A NaN or an infinity never takes the fast path: the row's top-level ones are spelled
    for float8 as before, and one nested in an event or the request snapshot is written as
    json.dumps wrote it (the bare constant, which PostgreSQL refuses: the write fails
    instead of storing a null)."""
    execution_id = uuid.uuid4()
    fields = _fields(execution_id, "FILLED", slippage_pips=float("nan"), spread_pips=1.5)
    assert _row_json(fields) == _reference_json({**fields, "slippage_pips": "NaN"}, allow_nan=False)
    nested = _fields(execution_id, "FILLED", request={"x": [float("inf")]})
    assert _row_json(nested) == _reference_json({**nested, "request": {"x": [float("inf")]}})
    assert "Infinity" in _row_json(nested)
    event = Event("validate", detail={"spread_pips": float("-inf")})
    assert "-Infinity" in _events_json([event])


def test_a_nested_non_finite_float_fails_the_write(store: Store) -> None:
    execution_id = uuid.uuid4()
    with store.connection() as conn:
        with pytest.raises(psycopg.Error):
            store.insert_intent(
                conn,
                _fields(execution_id, "SUBMITTING"),
                [Event("validate", "VALIDATED", detail={"spread_pips": float("nan")})],
            )
        assert store.load(conn, execution_id) is None
