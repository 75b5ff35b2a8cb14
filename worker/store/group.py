"""Group commit: executions written at the same moment share one transaction and one WAL flush.

A writer (a handler thread) queues its statement and waits. Whoever finds the committer free
becomes the leader of a batch: it takes every statement queued *now* (no timer: a lone write
goes out at once, so an idle worker pays no latency for batching), sends them pipelined
(psycopg pipeline mode) inside one BEGIN ... COMMIT on the committer's own connection, and hands
each writer its statement's first row. N writers in flight together cost one commit, one WAL
flush and one network round trip instead of N.

One bad statement must not fail its neighbours: if a batch fails, each of its statements is run
again alone, in its own transaction. The statements given here are written to be harmless when
run again after an outcome that is not known (an intent insert conflicts with itself, a final
update finds its row already settled), so a COMMIT lost with the connection is safe to retry.

Statements that depend on a session lease carry their own fence (``Store``'s ``held`` CTE: the
lease's backend still holds the session's advisory lock), checked inside the batch's
transaction: a writer whose lease was lost commits nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

MAX_BATCH = 64
LANES = 2

Query = str | sql.Composed | sql.SQL
Row = tuple[Any, ...]


@dataclass(eq=False)
class _Write:
    query: Query
    params: Mapping[str, Any]
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

    def execute(self, query: Query, params: Mapping[str, Any]) -> Row | None:
        """Commit ``query`` (with the statements queued beside it); its first row.

        Raises the statement's own error, e.g. a ``psycopg.Error`` (the write is then not
        committed, or harmlessly committed by a COMMIT whose reply was lost: see above)."""
        write = _Write(query, params)
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
        conn = lane.connection()
        with conn.pipeline():
            with conn.transaction():
                cursors = [conn.execute(write.query, write.params) for write in batch]
            rows = [cursor.fetchone() for cursor in cursors]
        for write, row in zip(batch, rows, strict=True):
            write.row = row

    @staticmethod
    def _alone(lane: _Lane, write: _Write) -> None:
        try:
            write.row = lane.connection().execute(write.query, write.params).fetchone()
        except Exception as exc:  # handed to its writer, whatever it is
            write.error = exc
