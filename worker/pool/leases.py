"""Leases: one MT5 session held exclusively through a PostgreSQL advisory lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from worker.errors import WorkerError
from worker.mt5 import api
from worker.mt5.sessions import SessionSpec

if TYPE_CHECKING:
    from worker.pool.pool import SessionPool

SessionState = Literal["idle", "in_use", "reconnecting", "down", "closed"]
LOCK_CLASS = 1  # first argument of the two-int advisory lock: 1 = MT5 session
# A two-int advisory lock shows in pg_locks as classid = key1, objid = key2 (as an unsigned
# 32-bit oid), objsubid = 2 (PostgreSQL docs, "pg_locks").
_HELD_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND objsubid = 2 AND classid = %s::oid"
    " AND objid = (%s::bigint & 4294967295)::oid)"
)


class ClaimTimeout(WorkerError):
    """No healthy session became free in time (or the database is unreachable)."""


class PoolClosed(ClaimTimeout):
    pass


class UnknownSession(ClaimTimeout):
    """``claim(session_key=...)`` or ``claim(session_id=...)`` named a session this process
    does not have."""


class UnknownAccount(ClaimTimeout):
    """``claim(account=...)`` named an account none of this process's sessions has."""


class LeaseLost(WorkerError):
    """The connection holding the session's lock is gone: do not touch the broker."""


@dataclass(frozen=True)
class Session:
    id: str
    spec: SessionSpec
    terminal: api.Terminal
    gateway: Any  # whatever gateway_factory built for this terminal
    login: int | None
    server: str | None


@dataclass(frozen=True)
class SessionHealth:
    id: str
    backend: str
    state: SessionState
    failures: int
    last_error: str | None
    login: int | None
    server: str | None


@dataclass(frozen=True)
class PoolHealth:
    size: int
    in_use: int
    unhealthy: int
    sessions: tuple[SessionHealth, ...]

    @property
    def available(self) -> int:
        return self.size - self.in_use - self.unhealthy


@dataclass
class _Parked:
    """A released lease whose connection still holds the session's lock."""

    conn: psycopg.Connection[Any]
    autocommit_was: bool
    locked_at: float  # monotonic: when the lock was taken
    parked_at: float


@dataclass
class _Slot:
    spec: SessionSpec
    session: Session | None = None
    in_use: bool = False
    healthy: bool = False
    failures: int = 0
    last_error: str | None = None
    recovery: threading.Thread | None = field(default=None, repr=False)
    parked: _Parked | None = field(default=None, repr=False)
    # after a hold of max_hold_seconds: not claimed here (except by id) until then, so a
    # process polling for this session gets its turn
    yield_until: float = 0.0

    def state(self, closed: bool, max_failures: int) -> SessionState:
        if closed:
            return "closed"
        if self.in_use:
            return "in_use"
        if self.healthy:
            return "idle"
        # "down" is still retried in the background, with the longest backoff
        return "down" if self.failures >= max_failures else "reconnecting"


class Lease:
    """One session for exclusive use until :meth:`release` (also a context manager)."""

    def __init__(
        self,
        pool: SessionPool,
        slot: _Slot,
        session: Session,
        conn: psycopg.Connection[Any],
        autocommit_was: bool,
        locked_at: float,
    ) -> None:
        self.session = session
        self.conn = conn
        self._pool = pool
        self._slot = slot
        self._autocommit_was = autocommit_was
        self._locked_at = locked_at
        self._released = False

    def __repr__(self) -> str:
        return f"Lease({self.session.id!r}, released={self._released})"

    def fence_check(self) -> None:
        """Raise LeaseLost if the lock's connection is known to be gone (no round trip).

        The real fence is the intent commit through :attr:`conn`: it fails if the
        connection, and with it the lock, was lost in a way not yet noticed here.
        """
        if self._released:
            raise LeaseLost(f"session {self.session.id}: lease already released")
        if self.conn.closed or self.conn.broken:
            raise LeaseLost(f"session {self.session.id}: the lock connection is gone")
        if not self._pool.connection_current(self.conn):
            # advisory locks do not survive a failover: this one is on an old primary
            raise LeaseLost(
                f"session {self.session.id}: the lock was taken on an earlier database primary"
            )

    def fence(self) -> None:
        """Prove with one round trip that this lease still holds the session's lock.

        Called immediately before every ``order_send`` (first sends, retries, later legs,
        closes): a lock connection that died while parked or while the terminal was busy,
        and a lock another process has taken since, refuse the send with LeaseLost.
        """
        self.fence_check()
        try:
            row = self.conn.execute(_HELD_SQL, (LOCK_CLASS, self.session.spec.lock_key)).fetchone()
        except psycopg.Error as exc:
            raise LeaseLost(
                f"session {self.session.id}: cannot prove the lock ({type(exc).__name__})"
            ) from None
        if not (row and row[0]):
            raise LeaseLost(f"session {self.session.id}: the session's lock is no longer held")

    def lock_holder(self) -> tuple[int, int, int]:
        """(backend pid of :attr:`conn`, lock class, lock key): the lock a write can name so
        that it commits only while this lease holds it (``worker.store.store.LockHeld``).
        libpq knows the pid: no round trip."""
        self.fence_check()
        return self.conn.info.backend_pid, LOCK_CLASS, self.session.spec.lock_key

    def release(self, *, broken: bool = False) -> None:
        """Unlock and give the session back; ``broken`` discards the database connection."""
        if self._released:
            return
        self._released = True
        self._pool._release(
            self._slot,
            self.conn,
            broken=broken,
            autocommit=self._autocommit_was,
            locked_at=self._locked_at,
        )

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release(broken=isinstance(exc, psycopg.OperationalError | LeaseLost))
