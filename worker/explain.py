"""One line and one exit code for every failure a command can meet (errors.py's table).

``execution-worker`` calls :func:`explain` on whatever a command raised: an operator mistake
(a bad setting or argument, a port in use, a path that is not a directory) or a dependency
that is not there (PostgreSQL, RabbitMQ) becomes one line naming the cause and the fix, with
the exit code of :class:`~worker.errors.ExitCode`; anything else is a bug, said as such
(exit 70: rerun with ``--debug`` for the traceback). Lines never carry a secret: URLs are
masked, libpq and RabbitMQ messages carry none.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from worker.config import ConfigError, mask_url
from worker.errors import ExitCode, WorkerError


@dataclass(frozen=True)
class Explained:
    line: str
    code: ExitCode


def _database_url() -> str:
    from worker.config import DEFAULT_DATABASE_URL

    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def _rabbitmq_url() -> str:
    from worker.config import DEFAULT_RABBITMQ_URL

    return os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL


def first_line(text: str) -> str:
    """The first non-empty line of a message, whitespace folded."""
    for line in str(text).splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def database_cause(url: str | None = None, timeout: int = 3) -> str:
    """Why PostgreSQL at ``url`` does not answer, in libpq's words ('' when it does).

    A pool that timed out keeps the cause to itself (it logs it); one direct connection
    attempt recovers it for the one line."""
    import psycopg

    try:
        with psycopg.connect(url or _database_url(), connect_timeout=timeout):
            return ""
    except psycopg.Error as exc:
        return first_line(str(exc)) or type(exc).__name__


def describe_database_error(exc: BaseException, url: str | None = None) -> Explained:
    """A psycopg or pool error: the cause, where, and what to do."""
    import psycopg
    import psycopg.errors
    from psycopg_pool import PoolTimeout

    where = mask_url(url or _database_url())
    if isinstance(exc, PoolTimeout):
        # no connection within the pool's timeout: the pool logged why, ask once more
        cause = database_cause(url) or f"no connection became free in time ({exc})"
        return Explained(
            f"cannot reach PostgreSQL at {where}: {cause}; check DATABASE_URL and that the"
            " server is up",
            ExitCode.DATABASE_UNREACHABLE,
        )
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return Explained(
            f"PostgreSQL at {where} has no execution schema (or not this table): run"
            " `execution-worker migrate` with this DATABASE_URL first",
            ExitCode.DATABASE_UNREACHABLE,
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return Explained(
            f"PostgreSQL at {where} refused: {first_line(str(exc))}; use the role this command"
            " needs (docs/OPERATIONS.md 2.5 and 2.6)",
            ExitCode.FAILED,
        )
    if isinstance(exc, psycopg.OperationalError):
        cause = first_line(str(exc)) or type(exc).__name__
        return Explained(
            f"cannot reach PostgreSQL at {where}: {cause}; check DATABASE_URL and that the"
            " server is up",
            ExitCode.DATABASE_UNREACHABLE,
        )
    return Explained(
        f"PostgreSQL at {where}: {type(exc).__name__}: {first_line(str(exc))}",
        ExitCode.FAILED,
    )


class DatabaseUnreachable(WorkerError):
    exit_code = ExitCode.DATABASE_UNREACHABLE


def require_database(url: str) -> None:
    """Fail at once, with libpq's reason, when PostgreSQL does not answer at ``url`` (instead
    of a pool's timeout seconds later that has forgotten why)."""
    cause = database_cause(url)
    if cause:
        raise DatabaseUnreachable(
            f"cannot reach PostgreSQL at {mask_url(url)}: {cause}; check DATABASE_URL and that"
            " the server is up"
        )


def describe_broker_error(exc: BaseException, url: str | None = None) -> Explained:
    """A pika connection error: refused credentials or vhost (77), or unreachable (3)."""
    import pika.exceptions

    where = mask_url(url or _rabbitmq_url())
    if isinstance(
        exc,
        pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError,
    ):
        return Explained(
            f"RabbitMQ at {where} refused the user or the vhost of RABBITMQ_URL"
            " (wrong password, unknown vhost or no permission on it); fix RABBITMQ_URL",
            ExitCode.ACCESS_REFUSED,
        )
    cause = first_line(str(exc)) or type(exc).__name__
    return Explained(
        f"cannot reach RabbitMQ at {where}: {type(exc).__name__} {cause}; check RABBITMQ_URL"
        " and that the broker is up",
        ExitCode.BROKER_UNREACHABLE,
    )


def _is_database_error(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("psycopg", "psycopg_pool"))


def _is_broker_error(exc: BaseException) -> bool:
    import pika.exceptions

    return isinstance(exc, pika.exceptions.AMQPConnectionError)


def explain(exc: BaseException) -> Explained:
    """The one line and exit code for ``exc`` (see the module's docstring)."""
    if isinstance(exc, ConfigError):
        return Explained(str(exc), ExitCode.CONFIG)
    if isinstance(exc, WorkerError):
        code = getattr(exc, "exit_code", ExitCode.FAILED)
        return Explained(str(exc), ExitCode(code))
    if _is_database_error(exc):
        return describe_database_error(exc)
    if _is_broker_error(exc):
        return describe_broker_error(exc)
    if isinstance(exc, OSError):
        return _describe_os_error(exc)
    if isinstance(exc, MemoryError | RecursionError):
        return Explained(f"{type(exc).__name__}", ExitCode.INTERNAL)
    return Explained(
        f"unexpected {type(exc).__name__}: {first_line(str(exc))} (a bug: rerun with --debug"
        " for the traceback and report it)",
        ExitCode.INTERNAL,
    )


def _describe_os_error(exc: OSError) -> Explained:
    name = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.EADDRINUSE:
        return Explained(
            f"address already in use{name}: another process listens on that port; stop it"
            " or choose another port",
            ExitCode.CONFIG,
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EROFS):
        return Explained(f"{reason}:{name or ' (no file name)'}", ExitCode.CONFIG)
    return Explained(f"{reason}{':' + name if name else ''}", ExitCode.FAILED)
