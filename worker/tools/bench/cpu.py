"""CPU seconds (user + system) of a consumer process tree and of the bench database's backends.

PostgreSQL: only the processes serving the bench's own database count (``pg_stat_activity``
rows with ``datname`` = the bench database: client backends, and an autovacuum worker if one
happens to run on its tables), never the shared walwriter, checkpointer or background writer.
Those serve every database of the cluster, and on this machine other sessions' test databases
run beside the bench, so their CPU cannot be put down to the bench. With ``synchronous_commit``
on, the committing backend writes and flushes its own WAL, so the backends' CPU holds the cost
of the commits. The worker and the floor use the same database but never at the same time
(a drained run starts its consumer, drains and stops it), so the backends of a run are its own.

The backends are found by their process titles (``postgres: USER DATABASE HOST(PORT) ...``,
PostgreSQL's ``update_process_title``), not by ``pg_stat_activity.pid``: a server in a
container reports the pids of its own pid namespace, which name other processes here. The
monitoring connection's own backend is left out by its client port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from worker.tools.bench.report import process_metrics


def _seconds(times: Any) -> float:
    return float(times.user) + float(times.system)


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) of one process, every thread it ever ran included.

    Read from the process's CPU-time clock, in nanoseconds: ``/proc/PID/stat`` (psutil's
    ``cpu_times``) counts in clock ticks of 10 ms, too coarse for a short run. The clock id
    is the one glibc's ``clock_getcpuclockid`` builds on Linux,
    ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)`` = ``(~pid << 3) | 2``; psutil's user +
    system where that clock cannot be read.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        psutil = process_metrics()
        return _seconds(psutil.Process(pid).cpu_times())


def process_tree_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and every descendant alive now, plus its reaped children."""
    psutil = process_metrics()
    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = process_seconds(pid) + float(times.children_user) + float(times.children_system)
        descendants = root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return 0.0
    for process in descendants:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            total += process_seconds(process.pid)
    return total


class Backends:
    """The processes serving one database, found through a monitoring connection of its own."""

    def __init__(self, database_url: str) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True, connect_timeout=10)
        row = self._conn.execute("SELECT current_database()").fetchone()
        self._database = str(row[0]) if row else ""
        sock = socket.socket(fileno=os.dup(self._conn.pgconn.socket))
        try:
            address = sock.getsockname()
        finally:
            sock.close()
        # TCP: the backend's title names our port; a Unix socket has none (title "[local]")
        self._own = f"({address[1]})" if isinstance(address, tuple) else None

    def _serves_bench(self, title: str) -> bool:
        """``postgres: [CLUSTER: ]USER DATABASE HOST(PORT) ...`` (a ``cluster_name`` such
        as Debian's ``15/main:`` comes first when set)."""
        words = title.split()
        if not words or words[0] != "postgres:":
            return False
        words = words[2:] if len(words) > 1 and words[1].endswith(":") else words[1:]
        return (
            len(words) >= 2
            and words[1] == self._database
            and (self._own is None or self._own not in title)
        )

    def seconds(self) -> dict[tuple[int, float], float]:
        """CPU seconds per backend, keyed by (pid, start) so a reused pid is a new backend."""
        psutil = process_metrics()
        found: dict[tuple[int, float], float] = {}
        for process in psutil.process_iter(["cmdline", "create_time"]):
            title = " ".join(process.info.get("cmdline") or ())
            if not self._serves_bench(title):
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                found[(process.pid, float(process.info["create_time"]))] = process_seconds(
                    process.pid
                )
        return found

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._conn.close()


@dataclass(frozen=True)
class Sample:
    """CPU counters read around ``at`` (``time.perf_counter``), with ``spread`` seconds
    between the first and the last reading."""

    at: float
    process: float
    backends: dict[tuple[int, float], float]
    spread: float = 0.0


def sample(pid: int, backends: Backends) -> Sample:
    """The counters of ``pid``'s tree and of the backends, stamped with the midpoint of the
    readings: a message confirmed while they were taken is as likely in as out."""
    started = time.perf_counter()
    process = process_tree_seconds(pid)
    found = backends.seconds()
    ended = time.perf_counter()
    return Sample((started + ended) / 2, process, found, ended - started)


@dataclass(frozen=True)
class Cost:
    """CPU seconds spent while ``messages`` confirmations arrived: consumer and PostgreSQL."""

    messages: int = 0
    process_s: float = 0.0
    postgres_s: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.messages + other.messages,
            self.process_s + other.process_s,
            self.postgres_s + other.postgres_s,
        )

    @property
    def process_ms(self) -> float:
        """Consumer CPU milliseconds per message (nan when nothing was counted)."""
        return 1000.0 * self.process_s / self.messages if self.messages else float("nan")

    @property
    def postgres_ms(self) -> float:
        """PostgreSQL CPU milliseconds per message (nan when nothing was counted)."""
        return 1000.0 * self.postgres_s / self.messages if self.messages else float("nan")


def cost(before: Sample, after: Sample, messages: int) -> Cost:
    """The CPU between two samples. A backend gone by ``after`` is left out (its last
    seconds are unknown); one new since ``before`` counts from zero (its whole life)."""
    postgres = sum(
        seconds - before.backends.get(key, 0.0) for key, seconds in after.backends.items()
    )
    return Cost(messages, max(0.0, after.process - before.process), max(0.0, postgres))
