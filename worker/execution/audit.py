"""Run bookkeeping of one handling: the audit events, stage timings and broker calls.

Events pile up in a :class:`Run` and are written with the next row change (intent, in-flight
update, final row), so one handling costs few round trips.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any
from uuid import UUID

import psycopg

from worker.mt5.gateway import BrokerCall
from worker.observability import metrics
from worker.store.store import Event, Store, StoreError

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Bookkeeping of one handling: events, stage timings, attempts."""

    clock: Callable[[], float]
    started: float
    events: list[Event] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    submissions: int = 0
    submitted_at: datetime | None = None
    retcode: int | None = None
    broker_comment: str | None = None
    filling_mode: int | None = None  # of the last order sent

    def stage(self, name: str) -> _Stage:
        """``with run.stage(name):`` adds the block's time to ``timings_ms[name]`` and to the
        stage histogram, also when it raises."""
        return _Stage(self, name)

    def event(self, stage: str, state: str | None = None, **detail: Any) -> None:
        self.events.append(Event(stage, "transition", state, detail=detail or None))

    def note(self, stage: str, **detail: Any) -> None:
        self.events.append(Event(stage, "note", detail=detail or None))

    def broker_calls(self, stage: str, calls: list[BrokerCall]) -> None:
        """The stage's terminal calls on the record: one ``broker_call`` row per order sent
        (with its request), and the stage's read-only queries folded into ONE
        ``broker_queries`` row whose detail lists each (function, latency, error): a row
        per query would cost more than the queries themselves."""
        queries: list[dict[str, Any]] = []
        sent: list[Event] = []
        for call in calls:
            if call.retcode is not None:
                metrics.record_retcode(call.retcode)
            if call.request is None:
                query: dict[str, Any] = {"function": call.function, "latency_ms": call.latency_ms}
                if call.error is not None:
                    query["error"] = list(call.error)
                queries.append(query)
                continue
            detail: dict[str, Any] = {"request": call.request}
            if call.error is not None:
                detail["error"] = list(call.error)
            sent.append(
                Event(
                    stage,
                    "broker_call",
                    function=call.function,
                    retcode=call.retcode,
                    latency_ms=call.latency_ms,
                    detail=detail,
                    at=call.at,
                )
            )
        if queries:
            self.events.append(
                Event(
                    stage,
                    "broker_queries",
                    latency_ms=round(sum(query["latency_ms"] for query in queries), 3),
                    detail={"calls": queries},
                    at=calls[0].at,
                )
            )
        self.events.extend(sent)

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def total(self) -> None:
        """Record the total time of the handling so far."""
        self.timings_ms["total"] = round((self.clock() - self.started) * 1000, 3)


class _Stage:
    """The context manager of ``Run.stage`` (a class: a generator-based one costs several
    times more, and a handling enters about seven)."""

    __slots__ = ("_begin", "_name", "_run")

    def __init__(self, run: Run, name: str) -> None:
        self._run = run
        self._name = name
        self._begin = 0.0

    def __enter__(self) -> None:
        self._begin = self._run.clock()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        run, name = self._run, self._name
        seconds = run.clock() - self._begin
        run.timings_ms[name] = round(run.timings_ms.get(name, 0.0) + seconds * 1000, 3)
        metrics.observe_stage(name, seconds)


def save_events(store: Store, conn: psycopg.Connection[Any], execution_id: UUID, run: Run) -> None:
    """Write the pending events of an execution that stays in flight (best effort)."""
    try:
        store.append_events(conn, execution_id, run.take_events())
    except (psycopg.Error, StoreError):
        log.warning("could not record events of %s", execution_id)
