"""The transactional outbox of the audit store (``worker.execution.outcome.Outbox``):
confirmations committed with their rows, read back for publishing and marked once the broker
took them (or refused them), and the watchers told of those committed off the handler path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg

from worker.execution.outcome import Publish

OutboxKey = UUID | tuple[UUID, int]  # an execution (all its versions) or one version
_KEYS_MATCH = (
    "(execution_id = ANY(%s::uuid[]) OR (execution_id, version) IN"
    " (SELECT * FROM unnest(%s::uuid[], %s::int[])))"
)


def _split_keys(keys: Sequence[OutboxKey]) -> tuple[list[UUID], list[UUID], list[int]]:
    bare = [key for key in keys if isinstance(key, UUID)]
    exact = [key for key in keys if not isinstance(key, UUID)]
    return bare, [key[0] for key in exact], [key[1] for key in exact]


class OutboxMixin:
    """The outbox methods of ``worker.store.store.Store``, which inherits them (and sets
    ``_watchers``)."""

    _watchers: list[Callable[[Publish], None]]

    if TYPE_CHECKING:

        def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]: ...

    def watch(self, watcher: Callable[[Publish], None]) -> Callable[[], None]:
        """``watcher`` is told of each confirmation committed off the handler path (the
        settler's); returns the call that stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None

    def announce(self, confirmation: Publish) -> None:
        """A confirmation just committed off the handler path: publish it now, not at the
        next sweep (each watcher must be quick and thread-safe)."""
        for watcher in list(self._watchers):
            watcher(confirmation)

    def unpublished(self, limit: int) -> list[Publish]:
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT execution_id, routing_key, payload, correlation_id, reply_to, version"
                " FROM execution.outbox WHERE published_at IS NULL AND next_attempt_at <= now()"
                " ORDER BY next_attempt_at, created_at LIMIT %s",
                (limit,),
            ).fetchall()
        return [
            Publish(row[0], row[1], row[2].encode("utf-8"), row[3], row[4], row[5]) for row in rows
        ]

    def mark_published(self, execution_ids: Sequence[OutboxKey]) -> None:
        """Mark confirmations published: ``(execution_id, version)`` marks that version; a
        bare execution id marks every unpublished version of it."""
        if not execution_ids:
            return
        bare, ids, versions = _split_keys(execution_ids)
        # The marker only spares the sweep a republish: if a crash loses it, the identical
        # confirmation (same message_id) goes out once more. So this one transaction does
        # not wait for its WAL flush; every audit write of the Store keeps synchronous_commit on.
        with self.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            conn.execute(
                "UPDATE execution.outbox SET published_at = now()"
                f" WHERE {_KEYS_MATCH} AND published_at IS NULL",
                (bare, ids, versions),
            )

    def mark_failed(
        self,
        execution_ids: Sequence[OutboxKey],
        *,
        backoff_seconds: float = 10.0,
        max_backoff_seconds: float = 300.0,
    ) -> None:
        """The broker refused these confirmations (returned or nacked): try them again after
        ``backoff_seconds * 2**attempts`` (at most ``max_backoff_seconds``), so the sweep
        takes the rows that are due first and never retries the same refused ones forever."""
        if not execution_ids:
            return
        bare, ids, versions = _split_keys(execution_ids)
        with self.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")  # like mark_published
            conn.execute(
                "UPDATE execution.outbox SET attempts = attempts + 1,"
                " next_attempt_at = now() + make_interval(secs =>"
                " least(%s, %s * power(2, least(attempts, 30))))"
                f" WHERE {_KEYS_MATCH} AND published_at IS NULL",
                (max_backoff_seconds, backoff_seconds, bare, ids, versions),
            )

    def outbox_backlog(self) -> tuple[int, float]:
        """(unpublished rows, age in seconds of the oldest) for metrics."""
        with self.connection() as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)"
                " FROM execution.outbox WHERE published_at IS NULL"
            ).fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)
