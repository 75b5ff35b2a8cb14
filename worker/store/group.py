"""Group commit: executions written at the same moment share one transaction and one WAL flush.

A writer (a handler thread) queues its statement and waits. Whoever finds the committer free
becomes the leader of a batch: it takes every statement queued *now* (no timer: a lone write
goes out at once, so an idle worker pays no latency for batching), sends them pipelined
(psycopg pipeline mode) inside one BEGIN ... COMMIT on the committer's own connection, and hands
each writer its statement's first row. N writers in flight together cost one commit, one WAL
flush and two network round trips (the second once their fences are read, see below) instead
of N.

One bad statement must not fail its neighbours: if a batch fails, each of its statements is run
again alone, in its own transaction. The statements given here are written to be harmless when
run again after an outcome that is not known (an intent insert conflicts with itself, a final
update finds its row already settled), so a COMMIT lost with the connection is safe to retry.

A write that depends on a session lease names its ``Fence`` (the lease's backend and the
session's advisory lock). The fences are read once more at the end of the write's transaction,
after all its writes, and its COMMIT is sent only if they all hold, else it rolls back (see
``_fenced``): a writer whose lease was lost commits nothing, even when its statement began
while the lease still held the lock and then waited on a row.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql

from worker.errors import WorkerError

log = logging.getLogger(__name__)

MAX_BATCH = 64
LANES = 2

Query = str | sql.Composed | sql.SQL
Row = tuple[Any, ...]


class Fence(Protocol):
    """The session lock a write depends on: the backend ``pid`` (a lease's connection) holds
    the two-int advisory lock (``lock_class``, ``lock_key``)."""

    @property
    def pid(self) -> int: ...

    @property
    def lock_class(self) -> int: ...

    @property
    def lock_key(self) -> int: ...


class FenceLost(WorkerError):
    """The write's fence was lost before its COMMIT: the write is not committed."""


def held_by(pid: str, lock_class: str, lock_key: str) -> str:
    """SQL that is true while the backend ``pid`` holds the advisory lock (``lock_class``,
    ``lock_key``) (the three are SQL expressions). A two-int advisory lock shows in pg_locks
    as classid = key1, objid = key2 (as an unsigned 32-bit oid), objsubid = 2 (PostgreSQL
    docs, "pg_locks"); the view shows the lock manager's state when it is read, not a
    transaction's snapshot."""
    return (
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
        f" AND pid = {pid} AND objsubid = 2 AND classid = {lock_class}"
        f" AND objid = ({lock_key} & 4294967295)::oid)"
    )


# The fences of a transaction's writes that are lost, read after its writes and before its
# COMMIT, which is sent only if there are none (see ``GroupCommit._fenced``). One statement,
# with parameters, so it is planned once per connection (psycopg prepares a statement it
# has run a few times); planning a
# pg_locks query costs more than running it.
_LOST_FENCES = (
    "SELECT count(*) FROM unnest(%(pids)s::int[], %(classes)s::oid[], %(keys)s::bigint[])"
    f" AS f(pid, lock_class, lock_key) WHERE NOT {held_by('f.pid', 'f.lock_class', 'f.lock_key')}"
)


@dataclass(eq=False)
class _Write:
    query: Query
    params: Mapping[str, Any]
    fence: Fence | None = None
    taken: bool = False  # a leader has it
    done: threading.Event = field(default_factory=threading.Event)
    row: Row | None = None
    error: Exception | None = None


@dataclass
class GroupStats:
    """How writes were grouped (tests read these)."""

    writes: int = 0
    batches: int = 0
    retried_alone: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)  # the last few batch sizes, newest last

    def count(self, size: int) -> None:
        self.writes += size
        self.batches += 1
        self.largest = max(self.largest, size)
        self.sizes.append(size)
        del self.sizes[:-32]


class _Lane:
    """One connection and its leader: at most one batch in flight on it."""

    def __init__(self, conninfo: str, connect_kwargs: Mapping[str, Any]) -> None:
        self.lock = threading.Lock()
        self._conninfo = conninfo
        self._connect_kwargs = connect_kwargs
        self._conn: psycopg.Connection[Any] | None = None
        self.closed = False

    def connection(self) -> psycopg.Connection[Any]:
        if self.closed:
            raise psycopg.OperationalError("the store is closed")
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.Connection.connect(self._conninfo, **self._connect_kwargs)
        return self._conn

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class GroupCommit:
    """Commits queued statements in batches, on connections of its own (thread-safe).

    ``lanes``: how many batches may be in flight at once, each on its own connection, so
    that grouping never serialises PostgreSQL's work onto one backend (one per core is
    plenty: a batch is as long as its slowest statement)."""

    def __init__(
        self,
        conninfo: str,
        connect_kwargs: Mapping[str, Any],
        *,
        lanes: int = LANES,
        max_batch: int = MAX_BATCH,
    ) -> None:
        kwargs = {**connect_kwargs, "autocommit": True}
        self._lanes = [_Lane(conninfo, kwargs) for _ in range(max(1, lanes))]
        self._max_batch = max_batch
        self._queue: deque[_Write] = deque()
        self._taking = threading.Lock()
        self.stats = GroupStats()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def execute(
        self, query: Query, params: Mapping[str, Any], *, fence: Fence | None = None
    ) -> Row | None:
        """Commit ``query`` (with the statements queued beside it); its first row.

        ``fence``: commit only if it still holds at the end of the transaction (FenceLost).
        Raises the statement's own error, e.g. a ``psycopg.Error`` (the write is then not
        committed, or harmlessly committed by a COMMIT whose reply was lost: see above)."""
        write = _Write(query, params, fence)
        self._queue.append(write)
        while not write.done.is_set():
            if write.taken:  # in a batch another leader is committing
                write.done.wait()
                break
            lane = self._free_lane()
            try:
                if not write.taken:
                    self._commit(lane, self._take())
            finally:
                lane.lock.release()
        if write.error is not None:
            raise write.error
        return write.row

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()

    # --- leaders ---------------------------------------------------------------------------

    def _free_lane(self) -> _Lane:
        """A lane whose lock this thread now holds: a free one, else wait for the first."""
        for lane in self._lanes:
            if lane.lock.acquire(blocking=False):
                return lane
        lane = self._lanes[threading.get_ident() % len(self._lanes)]
        lane.lock.acquire()
        return lane

    def _take(self) -> list[_Write]:
        batch: list[_Write] = []
        with self._taking:
            while self._queue and len(batch) < self._max_batch:
                write = self._queue.popleft()
                write.taken = True
                batch.append(write)
        return batch

    def _commit(self, lane: _Lane, batch: list[_Write]) -> None:
        if not batch:
            return
        self.stats.count(len(batch))
        try:
            if len(batch) == 1:
                self._alone(lane, batch[0])
                return
            try:
                self._together(lane, batch)
            except Exception as exc:
                log.warning(
                    "a group commit of %d writes failed (%s); each is retried alone",
                    len(batch),
                    type(exc).__name__,
                )
                self.stats.retried_alone += len(batch)
                for write in batch:
                    self._alone(lane, write)
        finally:
            for write in batch:
                write.done.set()

    @staticmethod
    def _together(lane: _Lane, batch: list[_Write]) -> None:
        """One transaction; a lost fence fails it (each write is then retried alone)."""
        conn = lane.connection()
        fences = [write.fence for write in batch if write.fence is not None]
        with conn.pipeline():
            with conn.transaction():
                cursors = [conn.execute(write.query, write.params) for write in batch]
                if fences:
                    GroupCommit._fenced(conn, fences)
            rows = [cursor.fetchone() for cursor in cursors]
        for write, row in zip(batch, rows, strict=True):
            write.row = row

    @staticmethod
    def _fenced(conn: psycopg.Connection[Any], fences: Sequence[Fence]) -> None:
        """In a transaction, after its writes: raise FenceLost (the transaction then rolls
        back) unless every fence still holds, so that its COMMIT is sent only then.

        The writes' statements read their fence (``Store``'s ``held`` CTE) when they begin,
        and that is not enough: an UPDATE that finds its row locked by another transaction
        waits for it, then re-checks only that row (PostgreSQL docs, 13.2.1 "Read Committed
        Isolation Level": the WHERE clause "is re-evaluated to see if the updated version of
        the row still matches the search condition", the EvalPlanQual recheck; the rest of
        the statement, the fence with it, keeps what it read before the wait: the command
        "does not see effects of those commands on other rows"). An INSERT ... ON CONFLICT
        likewise waits on a concurrent insert of its key. The lease can be lost during such a
        wait, and the session taken by another process.

        Here every write of the transaction holds its row: an UPDATE's row lock, an INSERT's
        new row (and key), each kept until the transaction ends (13.3.2 "Row-Level Locks").
        So if the fence still holds now, a process that takes the session after this reads
        waits on those rows until this transaction has ended, and then sees its outcome.
        (Withholding the COMMIT until the series is known good is one of the ways the
        PostgreSQL docs give to use a pipeline, 55.2.4 "Pipelining"; it costs one more round
        trip.)"""
        row = conn.execute(
            _LOST_FENCES,
            {
                "pids": [fence.pid for fence in fences],
                "classes": [fence.lock_class for fence in fences],
                "keys": [fence.lock_key for fence in fences],
            },
        ).fetchone()
        if row is None or row[0] != 0:
            raise FenceLost("a session lock a write depends on is lost")

    @staticmethod
    def _alone(lane: _Lane, write: _Write) -> None:
        try:
            if write.fence is None:  # one statement: its own transaction (autocommit)
                write.row = lane.connection().execute(write.query, write.params).fetchone()
            else:
                GroupCommit._together(lane, [write])
        except Exception as exc:  # handed to its writer, whatever it is
            write.error = exc
