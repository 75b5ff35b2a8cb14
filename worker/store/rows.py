"""Rows and events of the audit store: their types, states and columns, the store's errors,
and their encoding as the jsonb parameters the store's statements read (``_row_json``,
``_events_json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic_core import PydanticSerializationError, to_json

from worker.errors import WorkerError

TERMINAL_STATES = frozenset(
    {"FILLED", "PARTIALLY_FILLED", "REJECTED", "EXPIRED", "CANCELLED", "FAILED"}
)
IN_FLIGHT_STATES = frozenset({"SUBMITTING", "SUBMITTED"})
# The broker showed nothing of an order whose outcome is unknown: a provisional confirmation
# is on record (a redelivery answers it), and only the background reconciler settles the row
# (``Store.correct``) when a fill appears or its window ends (issue 18 item 3).
UNKNOWN_STATE = "UNKNOWN"

EXECUTION_COLUMNS = (
    "execution_id",
    "idempotency_key",
    "rpm_order_id",
    "state",
    "rejection_reason",
    "rejection_details",
    "symbol",
    "broker_symbol",
    "direction",
    "intended_units",
    "intended_lots",
    "executed_units",
    "executed_lots",
    "requested_price",
    "fill_price",
    "spread_pips",
    "slippage_pips",
    "deviation_points",
    "filling_mode",
    "comment_token",
    "magic",
    "session_id",
    "session_key",
    "account_login",
    "broker_order",
    "broker_deals",
    "broker_position",
    "retcode",
    "broker_comment",
    "attempts",
    "request",
    "decided_at",
    "received_at",
    "submitted_at",
    "completed_at",
    "arrival_bid",
    "arrival_ask",
    "closing_sent_at",
    "confirmation_version",
    "reconcile_attempts",
    "next_reconcile_at",
    "account",
    "settling",
)
_COLUMN_SET = frozenset(EXECUTION_COLUMNS)


@dataclass(frozen=True)
class ExecutionRow:
    """One row of ``execution.executions`` (``values`` holds every column by name)."""

    values: dict[str, Any]

    @property
    def execution_id(self) -> UUID:
        value: UUID = self.values["execution_id"]
        return value

    @property
    def state(self) -> str:
        value: str = self.values["state"]
        return value

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def answered(self) -> bool:
        """A confirmation is on record: final, or provisional (UNKNOWN)."""
        return self.terminal or self.state == UNKNOWN_STATE

    def get(self, column: str) -> Any:
        return self.values.get(column)


@dataclass(frozen=True)
class Event:
    """One row of ``execution.execution_events``."""

    stage: str
    kind: str = "transition"
    state: str | None = None
    function: str | None = None
    retcode: int | None = None
    latency_ms: float | None = None
    detail: dict[str, Any] | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


class StoreError(WorkerError):
    """The database refused or could not be reached; the message is requeued."""


class LockNotHeld(StoreError):
    """A write named a session lock its lease no longer holds: nothing was committed."""


@dataclass(frozen=True)
class LockHeld:
    """The session lock a write depends on: held by the backend ``pid`` (a lease's
    connection) as the two-int advisory lock (``lock_class``, ``lock_key``). A write that
    names it commits only while that backend still holds the lock (its fence): on the
    lease's connection, whose lock dies with it; group-committed, if the lock is still held
    once the write holds its row, just before COMMIT (a ``worker.store.group.Fence``)."""

    pid: int
    lock_class: int
    lock_key: int


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _fast_json(value: Any) -> str | None:
    """``value`` as JSON by pydantic-core's encoder (datetimes and UUIDs natively, a tenth of
    the cost of ``json.dumps`` with ``json_default``), or None where its text could differ in
    meaning from ``json.dumps``'s: a NaN or an infinity (the callers then take the ``json``
    path, which refuses them or spells them for PostgreSQL) or a value it cannot encode.

    With ``inf_nan_mode="constants"`` a non-finite float is written as the bare ``NaN`` /
    ``Infinity`` / ``-Infinity``; those bytes found anywhere (also inside a string: a false
    alarm only costs the slow path) send the value to the ``json`` path. Datetimes: aware
    UTC is written with ``Z`` (``json_default``: ``+00:00``), naive without an offset: the
    same instant in a timestamptz column (a datetime nested in a jsonb ``detail`` would keep
    that spelling; none is written there).
    """
    try:
        encoded = to_json(value, inf_nan_mode="constants")
    except (PydanticSerializationError, ValueError, TypeError):
        return None
    if b"NaN" in encoded or b"Infinity" in encoded:
        return None
    return encoded.decode("utf-8")


def _events_json(events: Sequence[Event]) -> str:
    rows = [
        {
            "at": event.at,
            "stage": event.stage,
            "kind": event.kind,
            "state": event.state,
            "function": event.function,
            "retcode": event.retcode,
            "latency_ms": event.latency_ms,
            "detail": event.detail,
        }
        for event in events
    ]
    return _fast_json(rows) or json.dumps(rows, default=json_default)


def _row_json(fields: dict[str, Any]) -> str:
    """Execution columns as ONE jsonb parameter, read with ``jsonb_populate_record``.

    A non-finite float (which JSON cannot carry) goes as the text PostgreSQL's float8
    input reads back: 'NaN', 'Infinity', '-Infinity'. (Callers have ``_checked`` the names.)
    """
    fast = _fast_json(fields)
    if fast is not None:
        return fast
    try:
        return json.dumps(fields, default=json_default, allow_nan=False)
    except ValueError:  # rare: a NaN or an infinity somewhere
        pass
    row = {
        column: _NON_FINITE[repr(value)]
        if isinstance(value, float) and not math.isfinite(value)
        else value
        for column, value in fields.items()
    }
    return json.dumps(row, default=json_default)


def json_default(value: Any) -> Any:
    """For request snapshots: datetimes and UUIDs as strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
