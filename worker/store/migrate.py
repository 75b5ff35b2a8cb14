"""Schema migrations: numbered ``.sql`` files shipped as package data, applied in order.

A file ``NNNN_name.sql`` in ``worker/store/migrations/`` is migration ``NNNN``. They run
under a transaction-scoped advisory lock, so processes starting together apply each once.
"""

from __future__ import annotations

import argparse
import re
from functools import cache
from importlib import resources
from typing import Any

import psycopg

MIGRATION_LOCK = 0x45574D47  # "EWMG"
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@cache
def migrations() -> tuple[tuple[int, str], ...]:
    """Every migration as (version, SQL), by version."""
    found: list[tuple[int, str]] = []
    for entry in resources.files("worker.store.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _ in found]
    if not found or versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..N without gaps, found {versions}")
    return tuple(found)


def _up_to_date(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('execution.schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return False
    done = {r[0] for r in conn.execute("SELECT version FROM execution.schema_migrations")}
    return all(version in done for version, _ in migrations())


def apply_migrations(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the missing migrations under a transaction-scoped advisory lock. Idempotent."""
    applied: list[int] = []
    if _up_to_date(conn):
        return applied  # no DDL at all: a least-privilege worker role can start
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE SCHEMA IF NOT EXISTS execution")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS execution.schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM execution.schema_migrations")}
        for version, sql in migrations():
            if version in done:
                continue
            conn.execute(sql.replace("CREATE SCHEMA IF NOT EXISTS execution;", ""))
            conn.execute(
                "INSERT INTO execution.schema_migrations (version) VALUES (%s)", (version,)
            )
            applied.append(version)
    return applied


def migrate_main(args: argparse.Namespace) -> int:
    """``execution-worker migrate``."""
    from worker.config import load_settings, mask_url
    from worker.store.partitions import MONTHS_AHEAD, ensure_partitions

    del args
    settings = load_settings()
    url = settings.database_url.get_secret_value()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            applied = apply_migrations(conn)
            print(f"migrate: {mask_url(url)}: applied {applied or 'nothing (up to date)'}")
            # the worker role cannot create tables: next months' partitions are made here
            # (and by `execution-worker retention`)
            created = ensure_partitions(conn, MONTHS_AHEAD)
    except psycopg.errors.InsufficientPrivilege:
        print(f"migrate: {mask_url(url)} is not the schema owner: run migrate as the owner role")
        return 1
    # any other psycopg.Error: one line with its cause and exit code (worker/explain.py)
    if created:
        print(f"migrate: created partitions {', '.join(created)}")
    return 0
