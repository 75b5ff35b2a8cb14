"""The store's reads and small writes for executions still to be settled: the UNKNOWN rows
the background recheck asks the broker about again, and the rows and deal checks the settler
finishes (a killed worker's found by a scan). A mixin of :class:`worker.store.store.Store`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from worker.store.rows import Event, ExecutionRow, _events_json
from worker.store.sql import _atomic, _events_insert


class SettlingMixin:
    # --- provisional (UNKNOWN) rows: the background reconciler --------------------------

    def unknown_due(self, conn: psycopg.Connection[Any], *, limit: int = 100) -> list[ExecutionRow]:
        """UNKNOWN rows whose next reconcile is due, the most overdue first."""
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM execution.executions WHERE state = 'UNKNOWN'"
                " AND coalesce(next_reconcile_at, updated_at) <= now()"
                " ORDER BY coalesce(next_reconcile_at, updated_at) LIMIT %s",
                (limit,),
            )
            return [ExecutionRow(dict(row)) for row in cur.fetchall()]

    def reconcile_later(
        self,
        conn: psycopg.Connection[Any],
        execution_id: UUID,
        delay_seconds: float,
        events: Sequence[Event],
    ) -> None:
        """An UNKNOWN row the broker still shows nothing of: ask again after the delay."""
        with _atomic(conn):
            conn.execute(
                "WITH moved AS (UPDATE execution.executions SET"
                " reconcile_attempts = reconcile_attempts + 1,"
                " next_reconcile_at = now() + make_interval(secs => %s)"
                " WHERE execution_id = %s AND state = 'UNKNOWN' RETURNING execution_id)"
                f" {_events_insert('moved')}",
                (delay_seconds, execution_id, _events_json(events)),
            )

    # --- the settler ------------------------------------------------------------------------

    def settling(
        self, conn: psycopg.Connection[Any], *, idle_seconds: float, limit: int = 500
    ) -> list[ExecutionRow]:
        """Rows left for the settler untouched for ``idle_seconds`` (a killed worker's, found
        by whoever is alive): in flight with ``settling`` set, and final rows whose deals are
        still to be checked (``settling`` is their deal check's document)."""
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT * FROM execution.executions WHERE settling IS NOT NULL"
                " AND state <> 'UNKNOWN' AND updated_at <= now() - make_interval(secs => %s)"
                " ORDER BY updated_at LIMIT %s",
                (idle_seconds, limit),
            )
            rows = [ExecutionRow(dict(row)) for row in cur.fetchall()]
            cur.execute(
                "SELECT e.*, c.document AS deal_check FROM execution.deal_checks c"
                " JOIN execution.executions e USING (execution_id)"
                " WHERE c.created_at <= now() - make_interval(secs => %s)"
                " ORDER BY c.created_at LIMIT %s",
                (idle_seconds, max(limit - len(rows), 0)),
            )
            for row in cur.fetchall():
                values = dict(row)
                values["settling"] = values.pop("deal_check")
                rows.append(ExecutionRow(values))
            return rows

    def checked(self, conn: psycopg.Connection[Any], execution_ids: Sequence[UUID]) -> None:
        """Final rows whose deals agreed with their replies (or were given up on): nothing
        left to check. One statement for a settler round."""
        if not execution_ids:
            return
        with _atomic(conn):
            conn.execute(
                "DELETE FROM execution.deal_checks WHERE execution_id = ANY(%s)",
                (list(execution_ids),),
            )

    def deal_check(
        self, conn: psycopg.Connection[Any], execution_id: UUID
    ) -> dict[str, Any] | None:
        """The deal check still owed for the execution (None: none, or done)."""
        row = conn.execute(
            "SELECT document FROM execution.deal_checks WHERE execution_id = %s", (execution_id,)
        ).fetchone()
        return None if row is None else dict(row[0])
