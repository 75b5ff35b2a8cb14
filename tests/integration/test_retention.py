"""Retention by whole monthly partitions (issue 18, item 9), on a real PostgreSQL.

- migration 0004 converts a database that already has rows (ids, grants, sequences kept);
- partitions exist ahead of time and rows land in their month's partition;
- ``retention`` detaches, archives and drops only partitions wholly older than the cutoff,
  never one that still holds an unfinished execution's events or an unpublished
  confirmation, and finishes what an interrupted run detached;
- the append-only trigger holds on every partition, for the owner too.
"""

from __future__ import annotations

import csv
import gzip
import io
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from worker.cli import main as cli_main
from worker.store import migrate
from worker.store import partitions as parts
from worker.store.migrate import apply_migrations
from worker.tools.retention import retire

OLD = datetime(2020, 1, 15, tzinfo=UTC)  # partitions of two old months: 2020-01 and 2020-02
CUTOFF = datetime.now(UTC) - timedelta(days=90)


@pytest.fixture
def db(new_database: Callable[[], str]) -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    url = new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
        yield url, conn


def _execution(conn: psycopg.Connection[Any], state: str, at: datetime) -> uuid.UUID:
    execution_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO execution.executions"
        " (execution_id, idempotency_key, state, comment_token, received_at)"
        " VALUES (%s, %s, %s, 't', %s)",
        (execution_id, f"k-{execution_id}", state, at),
    )
    return execution_id


def _event(conn: psycopg.Connection[Any], execution_id: uuid.UUID, at: datetime) -> None:
    conn.execute(
        "INSERT INTO execution.execution_events (execution_id, at, stage, kind)"
        " VALUES (%s, %s, 'submit', 'transition')",
        (execution_id, at),
    )


def _outbox(
    conn: psycopg.Connection[Any], execution_id: uuid.UUID, at: datetime, *, published: bool
) -> None:
    conn.execute(
        "INSERT INTO execution.outbox (execution_id, routing_key, payload, created_at,"
        " published_at) VALUES (%s, 'confirmation.filled.EURUSD', '{}', %s, %s)",
        (execution_id, at, at if published else None),
    )


def _where(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(f"SELECT tableoid::regclass::text FROM execution.{table}").fetchall()
    return sorted(row[0] for row in rows)


def _tables(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'execution' AND c.relkind IN ('r', 'p')"
    ).fetchall()
    return {row[0] for row in rows}


def _month(at: datetime) -> str:
    return at.strftime("%Y%m")


def _old_history(conn: psycopg.Connection[Any], *, state: str = "FILLED") -> uuid.UUID:
    """A 2020 execution with events in January and February and its published outbox row."""
    conn.execute("SELECT execution.ensure_partitions(0, %s)", ([OLD, OLD + timedelta(days=20)],))
    execution_id = _execution(conn, state, OLD)
    _event(conn, execution_id, OLD)
    _event(conn, execution_id, OLD + timedelta(days=20))  # February
    _outbox(conn, execution_id, OLD, published=True)
    return execution_id


def test_migration_0004_converts_a_database_with_rows(
    new_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = new_database()
    every = migrate.migrations()
    with psycopg.connect(url, autocommit=True) as conn:
        # the database as migrations 1 to 3 left it, with rows in it
        monkeypatch.setattr(migrate, "migrations", lambda: every[:3])
        assert apply_migrations(conn) == [1, 2, 3]
        monkeypatch.undo()
        old, new = _execution(conn, "FILLED", OLD), _execution(conn, "SUBMITTING", OLD)
        for at in (OLD, datetime.now(UTC)):
            _event(conn, old, at)
        _outbox(conn, old, OLD, published=False)
        before = conn.execute(
            "SELECT event_id, execution_id, at FROM execution.execution_events ORDER BY event_id"
        ).fetchall()

        assert apply_migrations(conn) == [v for v, _ in every[3:]]  # 4 and any later

        after = conn.execute(
            "SELECT event_id, execution_id, at FROM execution.execution_events ORDER BY event_id"
        ).fetchall()
        assert after == before  # every event kept, with its id
        now = datetime.now(UTC)
        assert _where(conn, "execution_events") == [
            f"execution.execution_events_p{_month(OLD)}",
            f"execution.execution_events_p{_month(now)}",
        ]
        assert _where(conn, "outbox") == [f"execution.outbox_p{_month(OLD)}"]
        assert conn.execute("SELECT count(*) FROM execution.executions").fetchone() == (2,)
        _event(conn, new, now)  # the sequence goes on after the copied ids
        newest = conn.execute("SELECT max(event_id) FROM execution.execution_events").fetchone()
        assert newest == (before[-1][0] + 1,)
        # the copies are gone; no row sits in a default partition
        assert not {"execution_events_unpartitioned", "outbox_unpartitioned"} & _tables(conn)
        assert parts.default_rows(conn) == {"execution_events": 0, "outbox": 0}


def test_partitions_exist_ahead_and_rows_land_in_their_month(
    db: tuple[str, psycopg.Connection[Any]],
) -> None:
    _, conn = db
    now = datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    ahead = [month]
    for _ in range(3):
        ahead.append((ahead[-1] + timedelta(days=32)).replace(day=1))
    names = {p.name for p in parts.partitions(conn) if p.attached}
    for start in ahead:  # this month and three more, for both tables
        assert {f"execution_events_p{_month(start)}", f"outbox_p{_month(start)}"} <= names
    assert parts.ensure_partitions(conn, 3) == []  # idempotent
    assert len(parts.ensure_partitions(conn, 4)) == 2  # one more month, both tables

    execution_id = _execution(conn, "FILLED", now)
    _event(conn, execution_id, now)
    _event(conn, execution_id, ahead[2] + timedelta(days=3))
    _outbox(conn, execution_id, now, published=False)
    assert _where(conn, "execution_events") == [
        f"execution.execution_events_p{_month(now)}",
        f"execution.execution_events_p{_month(ahead[2])}",
    ]
    assert _where(conn, "outbox") == [f"execution.outbox_p{_month(now)}"]


def test_the_append_only_trigger_holds_on_every_partition(
    db: tuple[str, psycopg.Connection[Any]],
) -> None:
    _, conn = db
    _old_history(conn)
    events = [
        row[0]
        for row in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'execution.execution_events'::regclass"
        ).fetchall()
    ]
    assert "execution_events_default" in events and len(events) >= 6
    for name in events:
        triggers = conn.execute(
            "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass"
            " AND NOT tgisinternal ORDER BY 1",
            (f"execution.{name}",),
        ).fetchall()
        assert triggers == [
            ("execution_events_append_only", "O"),
            ("execution_events_no_truncate", "O"),
        ], name
    # the owner (this superuser-owned test database) is refused too, partition by partition
    partition = f"execution.execution_events_p{_month(OLD)}"
    for statement in (
        f"DELETE FROM {partition}",
        f"UPDATE {partition} SET stage = 'forged'",
        f"TRUNCATE {partition}",
        "DELETE FROM execution.execution_events",
        "TRUNCATE execution.execution_events",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement)
    assert conn.execute(f"SELECT count(*) FROM {partition}").fetchone() == (1,)


def test_retention_archives_and_drops_only_old_months(
    db: tuple[str, psycopg.Connection[Any]], tmp_path: Path
) -> None:
    _, conn = db
    old = _old_history(conn)
    now = datetime.now(UTC)
    recent = _execution(conn, "FILLED", now)
    _event(conn, recent, now)
    _outbox(conn, recent, now, published=True)
    conn.execute(  # an awkward value: newlines, quotes and commas survive the archive
        "INSERT INTO execution.execution_events (execution_id, at, stage, kind, detail)"
        " VALUES (%s, %s, %s, 'note', %s)",
        (old, OLD, 'one\ntwo, "three"', '{"text": "one\\ntwo, \\"three\\""}'),
    )
    month = f"execution.execution_events_p{_month(OLD)}"
    original = conn.execute(f"SELECT * FROM {month} ORDER BY event_id").fetchall()
    lines: list[str] = []

    assert retire(conn, CUTOFF, archive_dir=tmp_path, out=lines.append) == 0

    conn.execute("CREATE TABLE restored (LIKE execution.execution_events)")
    with (
        gzip.open(tmp_path / f"execution_events_p{_month(OLD)}.csv.gz", "rb") as handle,
        conn.cursor().copy("COPY restored FROM STDIN (FORMAT csv, HEADER)") as copy,
    ):
        copy.write(handle.read())
    assert conn.execute("SELECT * FROM restored ORDER BY event_id").fetchall() == original
    assert len(original) == 2

    retired = {"execution_events_p202001", "execution_events_p202002"}
    retired |= {"outbox_p202001", "outbox_p202002"}
    assert not retired & _tables(conn)  # detached and dropped
    assert {"execution_events_default", "outbox_default"} <= _tables(conn)
    assert {f"execution_events_p{_month(now)}", f"outbox_p{_month(now)}"} <= _tables(conn)
    # recent rows untouched; the ledger keeps both executions
    assert _where(conn, "execution_events") == [f"execution.execution_events_p{_month(now)}"]
    assert conn.execute("SELECT count(*) FROM execution.executions").fetchone() == (2,)
    # one archive per retired partition, holding its rows
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.csv.gz" for n in retired)
    with gzip.open(tmp_path / "execution_events_p202002.csv.gz", "rt") as handle:
        archived = list(csv.DictReader(io.StringIO(handle.read())))
    assert [row["execution_id"] for row in archived] == [str(old)]
    assert any("archived" in line for line in lines)
    # run again: nothing left to retire
    assert retire(conn, CUTOFF, archive_dir=tmp_path, out=lines.append) == 0


@pytest.mark.parametrize("unfinished", ["execution in flight", "confirmation unpublished"])
def test_retention_refuses_a_partition_with_unfinished_rows(
    db: tuple[str, psycopg.Connection[Any]], tmp_path: Path, unfinished: str
) -> None:
    _, conn = db
    if unfinished == "execution in flight":
        _old_history(conn, state="SUBMITTING")
    else:
        execution_id = _old_history(conn)
        _outbox(conn, execution_id, OLD + timedelta(days=1), published=False)
    before = _tables(conn)
    lines: list[str] = []

    assert retire(conn, CUTOFF, archive_dir=tmp_path, out=lines.append) == 1

    assert _tables(conn) == before  # nothing detached, nothing dropped
    assert all(p.attached for p in parts.partitions(conn))
    assert list(tmp_path.iterdir()) == []
    assert any("REFUSED" in line for line in lines)


def test_a_dry_run_changes_nothing(db: tuple[str, psycopg.Connection[Any]], tmp_path: Path) -> None:
    _, conn = db
    _old_history(conn)
    before = _tables(conn)
    lines: list[str] = []
    assert retire(conn, CUTOFF, archive_dir=tmp_path, dry_run=True, out=lines.append) == 0
    assert _tables(conn) == before and list(tmp_path.iterdir()) == []
    assert any("would retire 4" in line for line in lines)


def test_an_interrupted_run_is_finished_by_the_next(
    db: tuple[str, psycopg.Connection[Any]], tmp_path: Path
) -> None:
    _, conn = db
    _old_history(conn)
    name = f"execution_events_p{_month(OLD)}"
    conn.execute(f"ALTER TABLE execution.execution_events DETACH PARTITION execution.{name}")
    (leftover,) = [p for p in parts.partitions(conn) if p.name == name]
    assert not leftover.attached

    lines: list[str] = []
    later = datetime(2020, 1, 20, tzinfo=UTC)  # a run with a shorter reach leaves it alone
    assert retire(conn, later, archive_dir=tmp_path, out=lines.append) == 0
    assert name in _tables(conn) and any(name in line and "WARNING" in line for line in lines)

    assert retire(conn, CUTOFF, archive_dir=tmp_path, out=lambda _: None) == 0

    assert name not in _tables(conn)
    assert (tmp_path / f"{name}.csv.gz").exists()


def test_the_command_runs_as_the_owner(
    db: tuple[str, psycopg.Connection[Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, conn = db
    _old_history(conn)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.delenv("DATABASE_URL_FILE", raising=False)
    archive = tmp_path / "archive"
    assert cli_main(["retention", "--older-than", "90d", "--dry-run"]) == 0
    assert f"execution_events_p{_month(OLD)}" in _tables(conn)
    # no terminal to ask and no --yes: refused before anything is detached
    assert cli_main(["retention", "--older-than", "13w", "--archive", str(archive)]) == 2
    assert f"execution_events_p{_month(OLD)}" in _tables(conn)
    assert list(archive.iterdir()) == []
    assert cli_main(["retention", "--older-than", "13w", "--archive", str(archive), "--yes"]) == 0
    assert f"execution_events_p{_month(OLD)}" not in _tables(conn)
    assert len(list(archive.iterdir())) == 4
    assert cli_main(["retention", "--older-than", "0d"]) != 0  # refused: at least a day


def test_a_busy_table_makes_retention_give_up_in_short_attempts_then_retry(
    db: tuple[str, psycopg.Connection[Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, conn = db
    _old_history(conn)
    monkeypatch.setattr(parts, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(parts, "LOCK_ATTEMPTS", 2)
    name = f"execution_events_p{_month(OLD)}"
    with psycopg.connect(url) as blocker:  # a long transaction that reads the events
        blocker.execute("SELECT count(*) FROM execution.execution_events")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            retire(conn, CUTOFF, archive_dir=tmp_path, out=lambda _: None)
        assert next(p for p in parts.partitions(conn) if p.name == name).attached
        with pytest.raises(psycopg.errors.LockNotAvailable):  # creating ahead, likewise
            parts.ensure_partitions(conn, 6)
        blocker.rollback()  # the lock goes; the next attempt gets it
    monkeypatch.setattr(parts, "LOCK_ATTEMPTS", 50)
    assert retire(conn, CUTOFF, archive_dir=tmp_path, out=lambda _: None) == 0
    assert name not in _tables(conn)
    assert len(parts.ensure_partitions(conn, 6)) == 6  # months 4 to 6 ahead, both tables
