"""``execution-worker retention``: retire whole months of audit events and outbox rows.

Runs as the schema OWNER (``DATABASE_URL`` / ``DATABASE_URL_FILE`` of ``migrate``), never
as the worker role. Each run first creates the partitions of the coming months (the
workers cannot), then, with ``--older-than``, retires every monthly partition that ends
before the cutoff: detach, archive (``--archive DIR``), drop. Rows are never deleted one
by one, and nothing happens at all if a partition to retire still holds an event of an
execution that is not final, or an unpublished confirmation (exit 1, the rows named by
partition). ``executions`` is kept: it is the idempotency ledger (docs/OPERATIONS.md 2.5).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from worker.config import ConfigError
from worker.store import partitions as parts
from worker.tools.confirm import confirmed
from worker.tools.paths import check_directory

_AGE = re.compile(r"^(\d+)([dw])$")
MIN_AGE = timedelta(days=1)


def parse_age(text: str) -> timedelta:
    """``90d`` or ``13w`` (days, weeks); at least one day. ConfigError otherwise."""
    match = _AGE.match(text.strip())
    if match is None:
        raise ConfigError(f"--older-than {text!r}: give days or weeks, e.g. 90d or 13w")
    count, unit = int(match.group(1)), match.group(2)
    age = timedelta(days=count) if unit == "d" else timedelta(weeks=count)
    if age < MIN_AGE:
        raise ConfigError("--older-than must be at least 1d")
    return age


@dataclass(frozen=True)
class Planned:
    partition: parts.Partition
    rows: int
    unfinished: int


def plan(conn: psycopg.Connection[Any], cutoff: datetime) -> list[Planned]:
    """The partitions wholly older than ``cutoff``, with their row counts."""
    return [
        Planned(p, parts.row_count(conn, p), parts.unfinished_rows(conn, p))
        for p in parts.partitions(conn)
        if p.end <= cutoff
    ]


def retire(
    conn: psycopg.Connection[Any],
    cutoff: datetime,
    *,
    archive_dir: Path | None = None,
    dry_run: bool = False,
    out: Any = print,
    confirm: Callable[[str], bool] | None = None,
) -> int:
    """Retire the partitions older than ``cutoff``; an exit code (1: refused, nothing done).

    ``confirm(question)`` is asked once before the first change (None: no question)."""
    for p in parts.partitions(conn):
        if not p.attached and p.end > cutoff:
            out(
                f"retention: WARNING: {p.name} was detached by an earlier run and is newer"
                " than this cutoff: left as it is (its rows are not in the table); retire it"
                " with that run's --older-than, or attach it back (ALTER TABLE ... ATTACH"
                " PARTITION)"
            )
    planned = plan(conn, cutoff)
    blocked = [item for item in planned if item.unfinished]
    for item in planned:
        p = item.partition
        state = "attached" if p.attached else "detached earlier"
        out(f"retention: {p.name} ({p.month}, {state}): {item.rows} rows")
    if blocked:
        for item in blocked:
            out(
                f"retention: REFUSED: {item.partition.name} holds {item.unfinished} rows of"
                " executions not final or confirmations not published; settle them first"
                " (execution-worker reconcile), or choose an older cutoff"
            )
        return 1
    if not planned:
        out(f"retention: no partition ends before {cutoff:%Y-%m-%d %H:%M} UTC")
        return 0
    if dry_run:
        out(f"retention: dry run: would retire {len(planned)} partitions")
        return 0
    names = ", ".join(item.partition.name for item in planned)
    if confirm is not None and not confirm(
        f"retention: detach{', archive' if archive_dir else ''} and DROP {names}"
    ):
        out("retention: not confirmed; nothing changed")
        return 1
    for item in planned:
        p = item.partition
        parts.detach(conn, p)
        if archive_dir is not None:
            saved = parts.archive(conn, p, archive_dir)
            out(
                f"retention: {p.name}: {saved.rows} rows archived to {saved.path}"
                f" (sha256 of the CSV {saved.sha256})"
            )
        parts.drop(conn, p)
        out(f"retention: {p.name}: detached and dropped")
    return 0


def main(args: argparse.Namespace) -> int:
    from worker.config import load_settings, mask_url

    older_than = parse_age(args.older_than) if args.older_than is not None else None
    # everything is checked before anything changes: a bad --archive is refused here, not
    # after a month was already detached
    archive_dir = check_directory(args.archive, "--archive") if args.archive else None
    if archive_dir is not None and older_than is None:
        raise ConfigError("--archive needs --older-than AGE (the months to retire)")
    settings = load_settings()
    url = settings.database_url.get_secret_value()
    # a psycopg.Error ends the command with one line: its cause and exit code (explain.py)
    with psycopg.connect(url, autocommit=True) as conn:
        if not parts.owns_schema(conn):
            print(
                f"retention: {mask_url(url)} does not log in as the owner of schema"
                " execution (run it with the migrate role's DATABASE_URL)"
            )
            return 1
        if not args.dry_run:
            created = parts.ensure_partitions(conn, args.months_ahead)
            made = ", ".join(created) if created else "none needed"
            print(f"retention: partitions {args.months_ahead} months ahead: created {made}")
        for table, count in parts.default_rows(conn).items():
            if count:
                print(
                    f"retention: WARNING: {count} rows of {table} are in {table}_default"
                    " (outside every monthly partition); they are never retired"
                )
        if older_than is None:
            print("retention: nothing retired (give --older-than AGE, e.g. 90d, to retire months)")
            return 0
        cutoff = datetime.now(UTC) - older_than
        return retire(
            conn,
            cutoff,
            archive_dir=archive_dir,
            dry_run=args.dry_run,
            confirm=lambda question: confirmed(question, assume_yes=args.yes),
        )
