"""Which PostgreSQL primary the worker writes to, and whether it has a synchronous standby.

A database *epoch* is (system identifier, timeline). Physical replicas share the system
identifier of the cluster they were copied from (``pg_control_system()``); a promoted
standby starts a new timeline ("Each time you recover to a new timeline, the timeline ID
is incremented": PostgreSQL docs, "Continuous Archiving", 26.3.5 Timelines). The timeline
is read from the name of the WAL file being written, ``pg_walfile_name(pg_current_wal_lsn())``
(its first 8 hex digits), not from ``pg_control_checkpoint()``: a fast promotion writes no
checkpoint, so the control file keeps the old timeline until the next one (seen on
PostgreSQL 15).

Every new connection of the store's pool passes :meth:`Epochs.observe` (psycopg_pool's
``configure`` callback), so no connection to a new primary is used before its epoch is
known. What follows from a new epoch:

- the fence refuses a session lease whose lock connection was made in an earlier epoch
  (:meth:`Epochs.is_current`): an advisory lock lives on one server only and does not
  survive a failover, so a lock on an old primary that is still reachable proves nothing;
  and a new connection that reaches a server on an older timeline than the newest seen
  (an old primary still up) is refused (:class:`EarlierPrimary`), so nothing is written
  there;
- with asynchronous replication the new primary may lack the newest commits of the old
  one, intents included: an approval decided before the switch (plus a margin, the
  approval TTL, for the clocks and the time it took to notice) may already have its order
  on the broker's books while its row is gone. :meth:`Epochs.suspect` says so, and the
  pipeline asks the broker by the order's magic before sending it
  (``worker.execution.failover``). Approvals older than the TTL are refused anyway, so the
  window closes by itself.

The epochs seen are kept in ``execution.database_epochs``: a worker started after a
failover finds the switch there (the row of the new epoch is younger than the TTL) even
though it never saw the old primary.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from worker.errors import WorkerError
from worker.observability import metrics

log = logging.getLogger(__name__)

_IDENTITY_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system()),"
    " CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,"
    " current_setting('synchronous_standby_names'), current_setting('synchronous_commit')"
)
_RECORD_SQL = (
    "INSERT INTO execution.database_epochs (system_identifier, timeline) VALUES (%s, %s)"
    " ON CONFLICT DO NOTHING"
)
_SEEN_SQL = (
    "SELECT extract(epoch FROM now() - first_seen_at)::float8,"
    " (SELECT count(*) FROM execution.database_epochs) FROM execution.database_epochs"
    " WHERE system_identifier = %s AND timeline = %s"
)
# synchronous_commit levels that wait for a synchronous standby (PostgreSQL docs,
# "synchronous_commit": local and off do not wait)
_WAITING_LEVELS = frozenset({"on", "remote_write", "remote_apply"})


class EarlierPrimary(psycopg.OperationalError, WorkerError):
    """A new connection reached a server on an older timeline than the primary's: the pool
    discards it (psycopg_pool drops a connection whose ``configure`` raises)."""


@dataclass(frozen=True)
class Epoch:
    system_identifier: int
    timeline: int


@dataclass(frozen=True)
class Replication:
    synchronous_standby_names: str
    synchronous_commit: str

    @property
    def synchronous(self) -> bool:
        """Commits wait for a synchronous standby (configured; whether one is connected
        right now needs pg_monitor: a commit then simply waits for it)."""
        names = self.synchronous_standby_names.strip()
        return bool(names) and self.synchronous_commit in _WAITING_LEVELS


def read_identity(conn: psycopg.Connection[Any]) -> tuple[Epoch, Replication] | None:
    """The epoch and replication settings of the server ``conn`` is on (None: a standby)."""
    row = conn.execute(_IDENTITY_SQL).fetchone()
    if not conn.autocommit:
        conn.commit()
    if row is None or row[1] is None:
        return None
    system_identifier, walfile, names, level = row
    epoch = Epoch(int(system_identifier), int(str(walfile)[:8], 16))
    return epoch, Replication(str(names), str(level))


class Epochs:
    """The epoch of every pooled connection and the newest one seen (thread-safe)."""

    def __init__(
        self, margin_seconds: float = 30.0, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.margin_seconds = margin_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._by_conn: weakref.WeakKeyDictionary[Any, Epoch] = weakref.WeakKeyDictionary()
        self.current: Epoch | None = None
        self.replication: Replication | None = None
        self.switched_at: float | None = None  # this process's clock
        self.persisted = False

    # --- the pool's configure callback -------------------------------------------------

    def observe(self, conn: psycopg.Connection[Any]) -> None:
        """Read the epoch of a new connection; record a switch (psycopg_pool ``configure``)."""
        found = read_identity(conn)
        if found is None:
            return  # a standby (no read-write target): its writes fail on their own
        epoch, replication = found
        with self._lock:
            self._by_conn[conn] = epoch
            known = self.current
            if (
                known is not None
                and known.system_identifier == epoch.system_identifier
                and epoch.timeline < known.timeline
            ):
                # an old primary still accepting connections (a split brain): never used
                raise EarlierPrimary(
                    f"connected to a server on timeline {epoch.timeline}, the primary is on"
                    f" timeline {known.timeline}"
                )
            previous, self.current, self.replication = self.current, epoch, replication
            changed = previous is not None and previous != epoch
            first = previous is None
        if changed:
            self._switched(previous, epoch, self._clock())
        if changed or first or not self.persisted:
            self._persist(conn, epoch, known_before=previous is not None)
        metrics.set_database(epoch.timeline, replication.synchronous)

    def _switched(self, previous: Epoch | None, epoch: Epoch, at: float) -> None:
        with self._lock:
            if self.switched_at is None or at > self.switched_at:
                self.switched_at = at
        metrics.record_database_switch()
        log.warning(
            "database switched to a new primary (timeline %s -> %d): every session lock is"
            " taken again, and approvals decided before the switch are reconciled with the"
            " broker by their magic before any send",
            previous.timeline if previous else "?",
            epoch.timeline,
        )

    def _persist(self, conn: psycopg.Connection[Any], epoch: Epoch, *, known_before: bool) -> None:
        """Record the epoch in ``execution.database_epochs`` and learn from it when the
        switch to it happened. Before the migration made the table: nothing (the store
        calls this again after migrating)."""
        try:
            with conn.transaction():
                recorded = conn.execute(
                    _RECORD_SQL, (epoch.system_identifier, epoch.timeline)
                ).rowcount
                row = conn.execute(_SEEN_SQL, (epoch.system_identifier, epoch.timeline)).fetchone()
        except (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege):
            return
        self.persisted = True
        if row is None:
            return
        age, count = float(row[0]), int(row[1])
        if count > 1 or (recorded and epoch.timeline > 1 and not known_before):
            # an earlier epoch is on record (or this one is new here on a promoted server):
            # the switch happened when the first worker saw this epoch
            self._switched_quietly(self._clock() - max(0.0, age))

    def _switched_quietly(self, at: float) -> None:
        with self._lock:
            if self.switched_at is None or at > self.switched_at:
                self.switched_at = at

    # --- questions -----------------------------------------------------------------------

    def is_current(self, conn: psycopg.Connection[Any]) -> bool:
        """False for a connection made in an earlier epoch (its locks are on an old primary)."""
        with self._lock:
            epoch = self._by_conn.get(conn)
            return epoch is None or self.current is None or epoch == self.current

    def switched_within(self, seconds: float) -> bool:
        """A switch was noticed less than ``seconds`` ago (on this object's clock)."""
        switched_at = self.switched_at
        return switched_at is not None and self._clock() < switched_at + seconds

    def suspect(self, decided_at: datetime | None) -> bool:
        """The approval may have been executed on an old primary whose commits the switch
        lost: decided before the switch, give or take the margin."""
        switched_at = self.switched_at
        if switched_at is None:
            return False
        if decided_at is None:
            return True
        decided = decided_at if decided_at.tzinfo else decided_at.replace(tzinfo=UTC)
        return decided.timestamp() <= switched_at + self.margin_seconds

    def describe(self) -> dict[str, Any]:
        """For readiness and the start-up log: names and flags, no secrets."""
        epoch, replication, switched = self.current, self.replication, self.switched_at
        return {
            "system_identifier": str(epoch.system_identifier) if epoch else None,
            "timeline": epoch.timeline if epoch else None,
            "synchronous_standby": replication.synchronous if replication else None,
            "synchronous_standby_names": replication.synchronous_standby_names
            if replication
            else None,
            "synchronous_commit": replication.synchronous_commit if replication else None,
            "switched_at": datetime.fromtimestamp(switched, UTC).isoformat() if switched else None,
        }
