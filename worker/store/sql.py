"""SQL fragments the store's statements are built of: the events INSERT, the row and
``held`` CTEs, the lock parameters, and the transaction wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from worker.store.group import held_by
from worker.store.rows import _COLUMN_SET, LockHeld

_EVENT_COLUMNS = "execution_id, at, stage, kind, state, function, retcode, latency_ms, detail"
_EVENT_RECORD = (
    "at timestamptz, stage text, kind text, state text, function text, retcode int,"
    " latency_ms float8, detail jsonb"
)


def _events_insert(source: str, placeholder: str = "%s") -> str:
    """An INSERT of many events in one statement, for ``execution_id`` rows of ``source``.

    The events arrive as ONE jsonb parameter (see ``_events_json``): encoding a list of
    dicts with the C JSON encoder costs a fraction of adapting eight typed arrays.
    """
    return (
        f"INSERT INTO execution.execution_events ({_EVENT_COLUMNS})"
        f" SELECT {source}.execution_id, e.* FROM {source},"
        f" jsonb_to_recordset({placeholder}::jsonb) AS e({_EVENT_RECORD})"
    )


# A one-row CTE ``r``: the row parameter, every column typed by the table's own record type.
def _row_cte(placeholder: str) -> str:
    record = f"jsonb_populate_record(NULL::execution.executions, {placeholder}::jsonb)"
    return f"r AS (SELECT * FROM {record})"


_ROW = _row_cte("%s")
_ROW_NAMED = _row_cte("%(row)s")
# A one-row CTE ``held``: does the session lease a write depends on still hold its lock, when
# the statement begins? (A refusal that writes nothing; the group checks the lock again before
# COMMIT, see worker.store.group.GroupCommit._fenced.) Without a lease: true.
_HELD = (
    "held AS (SELECT CASE WHEN %(pid)s::int IS NULL THEN true ELSE"
    f" {held_by('%(pid)s::int', '%(lock_class)s::oid', '%(lock_key)s::bigint')} END AS ok)"
)


@contextmanager
def _atomic(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """One statement is its own transaction in autocommit mode; otherwise wrap it."""
    if conn.autocommit:
        yield
    else:
        with conn.transaction():
            yield


def _checked(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - _COLUMN_SET
    if unknown:
        raise ValueError(f"unknown execution columns: {sorted(unknown)}")
    return fields


def _lock_params(lock: LockHeld | None) -> dict[str, Any]:
    if lock is None:
        return {"pid": None, "lock_class": None, "lock_key": None}
    return {"pid": lock.pid, "lock_class": lock.lock_class, "lock_key": lock.lock_key}
