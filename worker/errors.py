"""The worker's one exception base and its one table of process exit codes.

Every exception the worker raises on purpose derives from :class:`WorkerError`, so a caller
can tell "the worker said no" from a bug. Messages are safe to log: no secrets.

Exit codes (``execution-worker <command>``; the supervisor of ``run --processes N`` restarts
a child after any code not in :data:`FATAL`, whose cause a restart cannot fix). Every command
ends a failure with ONE line on stderr naming the cause and the fix (worker/explain.py), and
prints a traceback only with ``execution-worker --debug``. The same table is in
docs/OPERATIONS.md ("Exit codes").
"""

from __future__ import annotations

from enum import IntEnum


class WorkerError(Exception):
    """Base of every exception the worker raises on purpose; ``exit_code`` is what a
    command exits with when it ends on one (worker/explain.py)."""

    exit_code: int = 1  # ExitCode.FAILED


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the command ran and did not get what it asked for (timeout, unresolved rows)
    CONFIG = 2  # bad settings or arguments
    BROKER_UNREACHABLE = 3  # RabbitMQ could not be reached by a one-shot command
    START_FAILED = 4  # the worker could not start (its sessions, its terminals)
    DATABASE_UNREACHABLE = 5  # PostgreSQL could not be reached, or has no execution schema
    INTERNAL = 70  # a bug: an unexpected exception (rerun with --debug for the traceback)
    ACCESS_REFUSED = 77  # wrong RabbitMQ credentials or vhost: retrying cannot help
    TOPOLOGY_MISMATCH = 78  # an existing queue or exchange has other arguments
    INTERRUPTED = 130  # SIGINT
    PIPE_CLOSED = 141  # the reader of stdout went away (| head): 128 + SIGPIPE, said nothing


FATAL = frozenset({ExitCode.CONFIG, ExitCode.ACCESS_REFUSED, ExitCode.TOPOLOGY_MISMATCH})
