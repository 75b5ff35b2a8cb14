"""Logging: JSON lines (default) or console text, a per-message context, secrets redacted.

::

    configure_logging(format: "json" | "console" = "json", level: str | int = "INFO",
                      stream: TextIO | None = None) -> None
    register_secret(value: str | SecretStr | None) -> None   # masked wherever it appears
    register_settings_secrets(settings: Settings) -> None    # URL passwords, bridge secret
    with log_context(execution_id=..., order_id=..., symbol=..., stage=..., session=...):
        ...   # every line logged inside carries these fields
    redact(text: str) -> str                                  # for any other output

The context lives in a ``contextvars.ContextVar``: it follows the code on one thread, and a
new thread starts without it (set it inside the thread that handles the message, or run the
thread's function with ``contextvars.copy_context().run``).

Redaction covers the message, its arguments, exception text and extra fields: passwords in
URLs (``worker.config.mask_url``), ``password=...`` pairs (libpq strings) and every registered
secret value, also in its URL-quoted and JSON-escaped forms.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO
from urllib.parse import quote

from pydantic import SecretStr

from worker.config import MASK, Settings, mask_url

LogFormat = Literal["json", "console"]
MIN_SECRET_LENGTH = 3  # shorter values would mask ordinary text everywhere

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "execution_worker_log_context", default=_EMPTY
)
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None
_secrets_lock = threading.Lock()

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# A URL's userinfo the split above missed (a quote or space inside the password).
_USERINFO = re.compile(r"(://[^\s/:@]*:)[^@\s]+@")
_KEYWORD_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd|secret)=('[^']*'|\"[^\"]*\"|\S+)")

# Attributes every LogRecord has; the others came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


# --- secrets -----------------------------------------------------------------------------


def register_secret(value: str | SecretStr | None) -> None:
    """Mask ``value`` wherever it appears in log output (and in ``redact()``)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    forms = {value, quote(value, safe=""), quote(value), json.dumps(value)[1:-1]}
    global _secret_pattern
    with _secrets_lock:
        _secrets.update(form for form in forms if len(form) >= MIN_SECRET_LENGTH)
        # longest first, so a secret containing another is masked whole
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_pattern = re.compile("|".join(re.escape(form) for form in ordered))


def register_settings_secrets(settings: Settings) -> None:
    """Register every secret the settings hold: URL passwords and the bridge secret."""
    from urllib.parse import unquote, urlsplit

    for urls in (settings.rabbitmq_url, settings.database_url):
        for url in urls.get_secret_value().split(","):  # a cluster's nodes, or libpq hosts
            try:
                password = urlsplit(url).password
            except ValueError:
                continue
            if password:
                register_secret(unquote(password))
                register_secret(password)
    register_secret(settings.mt5_bridge_secret)


def forget_secrets() -> None:
    """Drop every registered secret (tests)."""
    global _secret_pattern
    with _secrets_lock:
        _secrets.clear()
        _secret_pattern = None


def redact(text: str) -> str:
    """``text`` with URL passwords, ``password=`` values and registered secrets masked."""
    if "://" in text:
        text = _URL.sub(lambda match: mask_url(match.group(0)), text)
        text = _USERINFO.sub(lambda match: f"{match.group(1)}{MASK}@", text)
    if "=" in text:
        text = _KEYWORD_PASSWORD.sub(lambda match: f"{match.group(1)}={MASK}", text)
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(key): _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return redact(str(value))


# --- context -----------------------------------------------------------------------------


class log_context:  # a function to its callers: ``with log_context(...):``
    """Add ``fields`` (None values skipped) to every line logged inside the block.

    A class, not a generator context manager: a handling enters two or three, and the
    generator machinery cost more than the context change itself."""

    __slots__ = ("_added", "_token")

    def __init__(self, **fields: object) -> None:
        self._added = {name: str(value) for name, value in fields.items() if value is not None}
        self._token: contextvars.Token[Mapping[str, str]] | None = None

    def __enter__(self) -> None:
        self._token = _context.set(MappingProxyType({**_context.get(), **self._added}))

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _context.reset(self._token)
            self._token = None


def current_context() -> dict[str, str]:
    return dict(_context.get())


# --- filter and formatters ---------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Puts the current ``log_context`` on the record as ``record.context``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _context.get()
        return True


class RedactingFilter(logging.Filter):
    """Renders the message, its arguments and exception text now, redacted, so no handler
    or formatter afterwards can see the raw values."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line (nor leak args)
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None  # exc_text carries it, redacted
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and name != "context":
                setattr(record, name, _redact_value(value))
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        name: value
        for name, value in vars(record).items()
        if name not in _STANDARD and name != "context"
    }


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, context, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "context", {}))
        for name, value in _extra_fields(record).items():
            line.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return redact(json.dumps(line, default=str, ensure_ascii=False))


EXECUTIONS_LOGGER = "worker.executions"  # one line per finished execution (console)
WORKER_INDEX_ENV = "EXECUTION_WORKER_INDEX"  # set by `run --processes N` for each child


def process_label() -> str:
    """``pid 4242`` in one process, ``w1/4242`` in child 1 of ``run --processes N``."""
    index = os.environ.get(WORKER_INDEX_ENV)
    return f"w{index}/{os.getpid()}" if index else f"pid {os.getpid()}"


class ConsoleFormatter(logging.Formatter):
    """``2026-11-25T10:00:00.123Z INFO  [w1/4242] logger: message  key=value ...`` for
    people: the process (and its index under ``run --processes N``) on every line."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {**getattr(record, "context", {}), **_extra_fields(record)}
        suffix = "  " + " ".join(f"{k}={v}" for k, v in fields.items()) if fields else ""
        text = (
            f"{_timestamp(record)} {record.levelname:<7} [{process_label()}] {record.name}: "
            f"{record.getMessage()}{suffix}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{record.stack_info}"
        return redact(text)


_HANDLER_NAME = "execution-worker"


def configure_logging(
    format: LogFormat = "json",
    level: str | int = "INFO",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route the root logger to ``stream`` (stderr) in ``format``; idempotent: replaces the
    handler an earlier call installed. Returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if format == "json" else ConsoleFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # pika logs every connection attempt at INFO with the full parameters
    logging.getLogger("pika").setLevel(max(logging.WARNING, root.level))
    # one line per finished execution is for people (console); JSON logs keep the IO thread
    # free of it unless LOG_LEVEL=DEBUG (worker/amqp/finished.py)
    logging.getLogger(EXECUTIONS_LOGGER).setLevel(
        logging.NOTSET if format == "console" or root.level <= logging.DEBUG else logging.WARNING
    )
    return handler
