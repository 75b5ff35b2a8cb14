"""The PostgreSQL audit store (psycopg 3): migrations, executions, events, outbox.

Durability rules (DOMAIN.md 3): the intent row is committed BEFORE the broker is called; the
final row, its events and the outbox row are committed in ONE transaction; the events table
is append-only (a trigger refuses UPDATE and DELETE); ``synchronous_commit`` stays on.

Writes that belong to one execution go through the connection of the session lease that
holds the lock of the execution's session (``Lease.conn``): if that connection is gone, the
commit fails and no order is sent, which fences a worker that lost its lease.

Each write is ONE statement (data-modifying CTEs) whose row and events arrive as two jsonb
parameters: one round trip, one commit, and little Python work per column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from worker.execution.outcome import Publish
from worker.store.epoch import Epochs
from worker.store.group import FenceLost, GroupCommit
from worker.store.migrate import apply_migrations
from worker.store.outbox import OutboxKey, OutboxMixin
from worker.store.rows import (
    EXECUTION_COLUMNS,
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    UNKNOWN_STATE,
    Event,
    ExecutionRow,
    LockHeld,
    LockNotHeld,
    StoreError,
    _events_json,
    _fast_json,
    _row_json,
    json_default,
)
from worker.store.settling import SettlingMixin
from worker.store.sql import (
    _HELD,
    _ROW,
    _ROW_NAMED,
    _atomic,
    _checked,
    _events_insert,
    _lock_params,
)

# Re-exported: the names other modules and tests import from here.
__all__ = [
    "EXECUTION_COLUMNS",
    "IN_FLIGHT_STATES",
    "OPEN_TIMEOUT_SECONDS",
    "TCP_KEEPALIVES",
    "TERMINAL_STATES",
    "UNKNOWN_STATE",
    "Event",
    "ExecutionRow",
    "LockHeld",
    "LockNotHeld",
    "OutboxKey",
    "Store",
    "StoreError",
    "_events_json",
    "_fast_json",
    "_row_json",
    "json_default",
]

log = logging.getLogger(__name__)

OPEN_TIMEOUT_SECONDS = 10.0  # waiting for a connection; then the message is requeued
# libpq TCP keepalives: a connection whose peer vanished (a PostgreSQL failover, a dead
# network path) is found dead within ~25 s instead of the kernel's two hours. Session locks
# live on these connections, so a lost lock must be noticed, not assumed held.
TCP_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def report_database(epochs: Epochs) -> None:
    """At start: the primary's epoch, and whether a synchronous standby has every commit."""
    about = epochs.describe()
    if about["synchronous_standby"]:
        log.info(
            "database: timeline %s, synchronous standby (synchronous_standby_names=%r,"
            " synchronous_commit=%s): a failover to it loses no commit",
            about["timeline"],
            about["synchronous_standby_names"],
            about["synchronous_commit"],
        )
    else:
        log.warning(
            "database: timeline %s, no synchronous standby (synchronous_standby_names=%r,"
            " synchronous_commit=%s): a failover may lose the newest commits; approvals"
            " decided before one are reconciled with the broker by magic before any send",
            about["timeline"],
            about["synchronous_standby_names"],
            about["synchronous_commit"],
        )


class Store(OutboxMixin, SettlingMixin):
    """Executions, events and the outbox. Thread-safe (a connection pool inside)."""

    def __init__(
        self, pool: ConnectionPool, group: GroupCommit | None = None, epochs: Epochs | None = None
    ) -> None:
        self.pool = pool
        self.group = group
        self.epochs = epochs or Epochs()
        self._watchers: list[Callable[[Publish], None]] = []

    @classmethod
    def open(
        cls,
        url: str,
        *,
        max_size: int = 10,
        group_commit: bool = False,
        switch_margin_seconds: float = 30.0,
    ) -> Store:
        """``group_commit``: lease-fenced intents and finals share transactions (see
        :mod:`worker.store.group`), on a connection of their own beside the pool.

        ``url`` may be a libpq multi-host URL (``postgresql://u@a:5432,b:5432/db?
        target_session_attrs=read-write``: libpq tries the hosts in order and keeps the
        first that accepts writes; PostgreSQL docs, "Connection Strings", 34.1.1.3
        Specifying Multiple Hosts). Every new connection's epoch is read first
        (:class:`~worker.store.epoch.Epochs`; ``switch_margin_seconds``: the approval TTL)."""
        epochs = Epochs(switch_margin_seconds)
        pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True, **TCP_KEEPALIVES},
            configure=epochs.observe,
            open=True,
            timeout=OPEN_TIMEOUT_SECONDS,
            name="execution-store",
        )
        group = GroupCommit(url, TCP_KEEPALIVES) if group_commit else None
        return cls(pool, group, epochs)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.pool.close()

    @property
    def closed(self) -> bool:
        """Closed by its owner (the process is closing): no connection will be handed out."""
        return bool(self.pool.closed)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            yield conn

    def migrate(self) -> list[int]:
        with self.connection() as conn:
            applied = apply_migrations(conn)
            self.epochs.observe(conn)  # now that execution.database_epochs exists
        report_database(self.epochs)
        return applied

    # --- reads -----------------------------------------------------------------------

    def load(self, conn: psycopg.Connection[Any], execution_id: UUID) -> ExecutionRow | None:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM execution.executions WHERE execution_id = %s", (execution_id,)
            )
            row = cur.fetchone()
        return ExecutionRow(dict(row)) if row is not None else None

    def confirmation_of(self, conn: psycopg.Connection[Any], execution_id: UUID) -> Publish | None:
        row = conn.execute(
            "SELECT routing_key, payload, correlation_id, reply_to, version FROM execution.outbox"
            " WHERE execution_id = %s ORDER BY version DESC LIMIT 1",
            (execution_id,),
        ).fetchone()
        if row is None:
            return None
        return Publish(execution_id, row[0], row[1].encode("utf-8"), row[2], row[3], row[4])

    def in_flight(
        self, conn: psycopg.Connection[Any], *, idle_seconds: float = 0.0
    ) -> list[ExecutionRow]:
        """Rows not yet terminal and not the settler's (``settling`` NULL), oldest first;
        ``idle_seconds``: untouched for that long."""
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM execution.executions"
                " WHERE state IN ('RECEIVED', 'VALIDATED', 'SUBMITTING', 'SUBMITTED')"
                " AND settling IS NULL"
                " AND updated_at <= now() - make_interval(secs => %s)"
                " ORDER BY received_at",
                (idle_seconds,),
            )
            return [ExecutionRow(dict(row)) for row in cur.fetchall()]

    # --- per-execution writes ---------------------------------------------------------

    def insert_intent(
        self,
        conn: psycopg.Connection[Any],
        fields: dict[str, Any],
        events: Sequence[Event],
        *,
        lock: LockHeld | None = None,
    ) -> bool:
        """Commit a new in-flight row with its events. False if the key already has a row.

        One statement (data-modifying CTEs). ``lock``: the session lease the intent depends
        on; the row is committed only while its backend holds the lock (else LockNotHeld),
        and the statement is group-committed with the writes in flight beside it.
        """
        columns = ", ".join(_checked(fields))
        query = (
            f"WITH {_HELD}, {_ROW_NAMED},"
            f" intent AS (INSERT INTO execution.executions ({columns})"
            f" SELECT {columns} FROM r, held WHERE held.ok"
            " ON CONFLICT DO NOTHING RETURNING execution_id),"
            f" events AS ({_events_insert('intent', '%(events)s')})"
            " SELECT (SELECT count(*) FROM intent), (SELECT ok FROM held)"
        )
        params = {"row": _row_json(fields), "events": _events_json(events)}
        return self._write(conn, query, params, lock, fields["execution_id"]) == 1

    def update_in_flight(
        self,
        conn: psycopg.Connection[Any],
        execution_id: UUID,
        fields: dict[str, Any],
        events: Sequence[Event],
        *,
        unset: str | None = None,
    ) -> None:
        """Commit progress of an in-flight row (e.g. SUBMITTED with the broker's ticket).

        ``unset``: a column that must still be NULL (a test-and-set: of two settlers, only
        the one whose write sets ``closing_sent_at`` sends the slippage close)."""
        assignments = ", ".join(f"{column} = r.{column}" for column in _checked(fields))
        guard = f" AND e.{unset} IS NULL" if unset and _checked({unset: None}) else ""
        with _atomic(conn):
            row = conn.execute(
                f"WITH {_ROW},"
                f" moved AS (UPDATE execution.executions e SET {assignments}, updated_at = now()"
                " FROM r WHERE e.execution_id = %s"
                f" AND e.state IN ('SUBMITTING', 'SUBMITTED'){guard} RETURNING e.execution_id),"
                f" events AS ({_events_insert('moved')})"
                " SELECT count(*) FROM moved",
                (_row_json(fields), execution_id, _events_json(events)),
            ).fetchone()
        if not row or row[0] != 1:
            which = f" with {unset} unset" if unset else ""
            raise StoreError(f"execution {execution_id} is not in flight{which}")

    def finish(
        self,
        conn: psycopg.Connection[Any],
        fields: dict[str, Any],
        events: Sequence[Event],
        confirmation: Publish,
        *,
        insert_only: bool = False,
        lock: LockHeld | None = None,
        check: dict[str, Any] | None = None,
    ) -> Publish:
        """Commit the terminal row, its events and the outbox row in ONE statement.

        ``insert_only``: a refusal before any broker call inserts its row, and a key that
        already has one keeps it (a refusal never overwrites a row). Otherwise the
        execution's in-flight row is settled (an UPDATE). Returns the confirmation that is
        on record: when the key already had a terminal row (a concurrent or earlier
        outcome), that one, unchanged. A row still in flight under ``insert_only``, or no
        row at all otherwise, raises StoreError (the delivery is requeued). ``lock``: as for
        :meth:`insert_intent` (fenced and group-committed). ``check``: the deal check the
        settler owes a fill settled from its replies (``deal_checks``), in the same statement.
        """
        columns = list(_checked(fields))
        execution_id: UUID = fields["execution_id"]
        if insert_only:
            listed = ", ".join(columns)
            write = (
                f"INSERT INTO execution.executions ({listed}) SELECT {listed} FROM r, held"
                " WHERE held.ok ON CONFLICT DO NOTHING RETURNING execution_id"
            )
        else:
            assignments = ", ".join(
                f"{column} = r.{column}" for column in columns if column != "execution_id"
            )
            write = (
                f"UPDATE execution.executions e SET {assignments}, updated_at = now()"
                " FROM r, held WHERE held.ok AND e.execution_id = r.execution_id"
                " AND e.state NOT IN ('FILLED', 'PARTIALLY_FILLED', 'REJECTED', 'EXPIRED',"
                " 'CANCELLED', 'FAILED', 'UNKNOWN') RETURNING e.execution_id"
            )
        query = (
            f"WITH {_HELD}, {_ROW_NAMED}, final AS ({write}),"
            f" events AS ({_events_insert('final', '%(events)s')}),"
            " outbox AS (INSERT INTO execution.outbox"
            " (execution_id, routing_key, payload, correlation_id, reply_to)"
            " SELECT final.execution_id, %(routing_key)s, %(payload)s, %(correlation_id)s,"
            " %(reply_to)s FROM final)"
            + (
                ", checks AS (INSERT INTO execution.deal_checks (execution_id, document)"
                " SELECT final.execution_id, %(check)s::jsonb FROM final)"
                if check is not None
                else ""
            )
            + " SELECT (SELECT count(*) FROM final), (SELECT ok FROM held)"
        )
        params = {
            "row": _row_json(fields),
            "events": _events_json(events),
            "routing_key": confirmation.routing_key,
            "payload": confirmation.payload.decode("utf-8"),
            "correlation_id": confirmation.correlation_id,
            "reply_to": confirmation.reply_to,
        }
        if check is not None:
            params["check"] = _fast_json(check) or json.dumps(check, default=json_default)
        if self._write(conn, query, params, lock, execution_id) != 1:
            existing = self.confirmation_of(conn, execution_id)
            if existing is None:
                state = "a row still in flight" if insert_only else "no row in flight"
                raise StoreError(f"execution {execution_id} has {state}")
            return existing
        return confirmation

    def _write(
        self,
        conn: psycopg.Connection[Any],
        query: str,
        params: dict[str, Any],
        lock: LockHeld | None,
        execution_id: UUID,
    ) -> int:
        """Run a write whose statement has the ``held`` CTE and returns ``(count, held)``;
        the count. With group commit and a ``lock``, the write is group-committed, and its
        statement and its transaction's end check the lock (LockNotHeld if the lease lost it
        at either). Otherwise it runs on ``conn``, the lease's own connection, whose commit is
        its fence (the lock lives and dies with that connection): no pg_locks read is paid."""
        grouped = lock if self.group is not None else None
        params = {**params, **_lock_params(grouped)}
        if self.group is not None and grouped is not None:
            try:
                row = self.group.execute(query, params, fence=grouped)
            except FenceLost as exc:
                raise LockNotHeld(f"execution {execution_id}: the session lock is lost") from exc
        else:
            with _atomic(conn):
                row = conn.execute(query, params).fetchone()
        if row is None:
            raise StoreError("a write returned no row")
        if not row[1]:
            raise LockNotHeld(f"execution {execution_id}: the session lock is lost")
        return int(row[0])

    # --- provisional (UNKNOWN) rows: corrected here (reads in worker.store.settling) ----

    def correct(
        self,
        conn: psycopg.Connection[Any],
        fields: dict[str, Any],
        events: Sequence[Event],
        confirmation: Publish,
        *,
        from_state: str = UNKNOWN_STATE,
    ) -> bool:
        """Settle an UNKNOWN row (``from_state``: or a final row whose deals contradict the
        reply it was settled from) with a new version of its confirmation, in ONE statement:
        the row, its events, and a NEW outbox row for the new version (payloads are never
        rewritten); an earlier version still unpublished is superseded (marked published:
        the new one carries the truth). False: the row is no longer UNKNOWN at the version
        before this one (settled elsewhere)."""
        columns = [c for c in _checked(fields) if c != "execution_id"]
        assignments = ", ".join(f"{column} = r.{column}" for column in columns)
        with _atomic(conn):
            row = conn.execute(
                f"WITH {_ROW}, final AS (UPDATE execution.executions e SET {assignments},"
                " confirmation_version = %s, updated_at = now() FROM r"
                " WHERE e.execution_id = r.execution_id AND e.state = %s"
                " AND e.confirmation_version = %s RETURNING e.execution_id),"
                f" events AS ({_events_insert('final')}),"
                " superseded AS (UPDATE execution.outbox o SET published_at = now()"
                " FROM final WHERE o.execution_id = final.execution_id"
                " AND o.published_at IS NULL),"
                # a correction settles the deal check that found the contradiction
                " checked AS (DELETE FROM execution.deal_checks c USING final"
                " WHERE c.execution_id = final.execution_id),"
                " outbox AS (INSERT INTO execution.outbox"
                " (execution_id, version, routing_key, payload, correlation_id, reply_to)"
                " SELECT final.execution_id, %s, %s, %s, %s, %s FROM final)"
                " SELECT count(*) FROM final",
                (
                    _row_json(fields),
                    confirmation.version,
                    from_state,
                    confirmation.version - 1,
                    _events_json(events),
                    confirmation.version,
                    confirmation.routing_key,
                    confirmation.payload.decode("utf-8"),
                    confirmation.correlation_id,
                    confirmation.reply_to,
                ),
            ).fetchone()
        return bool(row and row[0] == 1)

    def append_events(
        self, conn: psycopg.Connection[Any], execution_id: UUID, events: Sequence[Event]
    ) -> None:
        if not events:
            return
        with _atomic(conn):
            conn.execute(
                f"WITH one AS (SELECT %s::uuid AS execution_id) {_events_insert('one')}",
                (execution_id, _events_json(events)),
            )

    def in_flight_age(self) -> tuple[int, float]:
        """(non-final rows, seconds since the oldest of them was received) for metrics."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(received_at)), 0)"
                " FROM execution.executions"
                " WHERE state IN ('RECEIVED', 'VALIDATED', 'SUBMITTING', 'SUBMITTED')"
            ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    def ping(self) -> bool:
        try:
            with self.connection() as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, OSError):
            return False

    def events_of(self, conn: psycopg.Connection[Any], execution_id: UUID) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM execution.execution_events WHERE execution_id = %s"
                " ORDER BY event_id",
                (execution_id,),
            )
            return [dict(row) for row in cur.fetchall()]
