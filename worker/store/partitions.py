"""Monthly partitions of the audit tables: creating them ahead, finding and retiring old ones.

``execution_events`` (by ``at``) and ``outbox`` (by ``created_at``) are partitioned by month
in UTC (migration 0004); ``executions`` is not (it is the exactly-once ledger: its
idempotency key must stay unique across all time). Partitions are named
``<table>_pYYYYMM``; each table also has a ``<table>_default`` partition for rows outside
them. Everything here needs the owner role: the worker role can neither create, detach
nor drop a table.

A month is retired whole: DETACH (a catalog change, taken under ``lock_timeout``), an
optional archive of the detached table (COPY to a gzip'd CSV file, written aside and
renamed once complete), then DROP. A detached table left by an interrupted run keeps its
name and is finished by the next run.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from worker.store.store import TERMINAL_STATES

MONTHS_AHEAD = 3  # `migrate` creates the current month's partitions and this many more
PARTITIONED = {"execution_events": "at", "outbox": "created_at"}
_NAME = re.compile(r"^(execution_events|outbox)_p(\d{4})(\d{2})$")
# DETACH and DROP need brief strong locks on the parent and, through the foreign key, on
# executions. A DDL statement waiting for a lock makes every later writer wait behind it, so
# each attempt gives up quickly and is tried again, rather than stall the workers.
LOCK_TIMEOUT = "1s"
LOCK_ATTEMPTS = 20


@dataclass(frozen=True)
class Partition:
    """One monthly partition (attached, or detached by an interrupted retention run)."""

    name: str
    parent: str
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive, UTC
    attached: bool

    @property
    def month(self) -> str:
        return self.start.strftime("%Y-%m")


def ensure_partitions(conn: psycopg.Connection[Any], months_ahead: int) -> list[str]:
    """Create the current month's partitions and ``months_ahead`` more; the names created.

    Creating a partition locks its table briefly (and scans the default partition), so
    this runs under short lock timeouts too. Autocommit conn."""

    def work(conn: psycopg.Connection[Any]) -> list[str]:
        rows = conn.execute("SELECT execution.ensure_partitions(%s)", (months_ahead,)).fetchall()
        return [row[0] for row in rows]

    return _short_locks(conn, work)


def _month_after(start: datetime) -> datetime:
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def partitions(conn: psycopg.Connection[Any]) -> list[Partition]:
    """Every monthly partition of the schema, attached or left detached, oldest first."""
    rows = conn.execute(
        "SELECT c.relname, c.relispartition FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'execution' AND c.relkind = 'r'"
        " AND c.relname ~ '^(execution_events|outbox)_p[0-9]{6}$'"
    ).fetchall()
    found: list[Partition] = []
    for name, attached in rows:
        match = _NAME.match(name)
        if match is None:
            continue
        start = datetime(int(match.group(2)), int(match.group(3)), 1, tzinfo=UTC)
        found.append(Partition(name, match.group(1), start, _month_after(start), bool(attached)))
    found.sort(key=lambda p: (p.start, p.parent))
    return found


def default_rows(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows that fell outside the monthly partitions, per table (should be 0)."""
    counts: dict[str, int] = {}
    for parent in PARTITIONED:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM execution.{}").format(sql.Identifier(f"{parent}_default"))
        ).fetchone()
        counts[parent] = int(row[0]) if row else 0
    return counts


def row_count(conn: psycopg.Connection[Any], partition: Partition) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM execution.{}").format(sql.Identifier(partition.name))
    ).fetchone()
    return int(row[0]) if row else 0


def unfinished_rows(conn: psycopg.Connection[Any], partition: Partition) -> int:
    """Rows that still matter to a running execution: an event of an execution that is not
    final, or an outbox row not yet published. A partition holding any is never retired."""
    table = sql.Identifier(partition.name)
    terminal = list(TERMINAL_STATES)
    if partition.parent == "execution_events":
        query = sql.SQL(
            "SELECT count(*) FROM execution.{} ev JOIN execution.executions e"
            " USING (execution_id) WHERE NOT (e.state = ANY(%s))"
        ).format(table)
        row = conn.execute(query, (terminal,)).fetchone()
    else:
        query = sql.SQL(
            "SELECT count(*) FROM execution.{} o JOIN execution.executions e"
            " USING (execution_id) WHERE o.published_at IS NULL OR NOT (e.state = ANY(%s))"
        ).format(table)
        row = conn.execute(query, (terminal,)).fetchone()
    return int(row[0]) if row else 0


T = TypeVar("T")


def _short_locks(conn: psycopg.Connection[Any], work: Callable[[psycopg.Connection[Any]], T]) -> T:
    """``work`` in one transaction under a short ``lock_timeout``, retried while a lock is
    busy (``LOCK_ATTEMPTS`` times, then LockNotAvailable is raised). Autocommit conn."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            with conn.transaction():
                conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT))
                )
                return work(conn)
        except psycopg.errors.LockNotAvailable:
            if attempt == LOCK_ATTEMPTS:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _ddl(
    conn: psycopg.Connection[Any],
    statement: sql.Composed,
    guard: Callable[[psycopg.Connection[Any]], None] | None = None,
) -> None:
    """One DDL statement (after ``guard``, in the same transaction) under short locks."""

    def work(conn: psycopg.Connection[Any]) -> None:
        if guard is not None:
            guard(conn)
        conn.execute(statement)

    _short_locks(conn, work)


def detach(conn: psycopg.Connection[Any], partition: Partition) -> None:
    """Detach ``partition`` from its table (no-op if already detached). Autocommit conn.

    Not ``DETACH ... CONCURRENTLY``: PostgreSQL refuses it when the table has a default
    partition (ALTER TABLE reference, DETACH PARTITION), and ours have one.
    """
    if not partition.attached:
        return
    _ddl(
        conn,
        sql.SQL("ALTER TABLE execution.{} DETACH PARTITION execution.{}").format(
            sql.Identifier(partition.parent), sql.Identifier(partition.name)
        ),
    )


@dataclass(frozen=True)
class Archive:
    path: Path
    rows: int
    sha256: str


def archive(conn: psycopg.Connection[Any], partition: Partition, directory: Path) -> Archive:
    """COPY the (detached) partition to ``directory/<name>.csv.gz``: written aside, fsync'd,
    renamed when complete. Raises if the file's row count differs from the table's."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{partition.name}.csv.gz"
    partial = target.with_name(target.name + ".partial")
    expected = row_count(conn, partition)
    order = "event_id" if partition.parent == "execution_events" else "created_at, execution_id"
    query = sql.SQL("COPY (SELECT * FROM execution.{} ORDER BY {}) TO STDOUT (FORMAT csv, HEADER)")
    digest = hashlib.sha256()
    with conn.cursor() as cur:
        with partial.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as out:
            with cur.copy(query.format(sql.Identifier(partition.name), sql.SQL(order))) as copy:
                for block in copy:
                    data = bytes(block)
                    out.write(data)
                    digest.update(data)
            out.close()
            raw.flush()
            os.fsync(raw.fileno())
        copied = cur.rowcount
    if copied != expected:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{partition.name}: copied {copied} rows, the table has {expected}")
    partial.replace(target)
    _fsync_dir(directory)
    return Archive(target, copied, digest.hexdigest())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def drop(conn: psycopg.Connection[Any], partition: Partition) -> None:
    """Drop a DETACHED partition (never an attached one: its table would lose a month)."""

    def detached(conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(
            "SELECT relispartition FROM pg_class WHERE oid = to_regclass(%s)",
            (f"execution.{partition.name}",),
        ).fetchone()
        if row is None or row[0]:
            raise RuntimeError(f"{partition.name} is missing or still attached: not dropped")

    _ddl(conn, sql.SQL("DROP TABLE execution.{}").format(sql.Identifier(partition.name)), detached)


def owns_schema(conn: psycopg.Connection[Any]) -> bool:
    """Whether this connection's role owns the partitioned tables (the migrate role)."""
    row = conn.execute(
        "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class"
        " WHERE oid = to_regclass('execution.execution_events')"
    ).fetchone()
    return bool(row and row[0])
