"""Every terminal call goes through :class:`Calls`: timed, recorded for the audit trail.

A lost connection outside ``order_send`` becomes :class:`SessionLost` so that the session
pool reconnects; inside ``order_send`` it is an unknown outcome (the caller decides).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from worker.mt5 import api
from worker.mt5.gateway.errors import QueryFailed, SessionLost
from worker.mt5.gateway.model import BrokerCall

T = TypeVar("T")
QUERY_RETRIES = 2  # a history/position query answering None is asked up to 3 times in all


def _is_none(result: object) -> bool:
    return result is None


class Calls:
    """The call recorder of one gateway (not thread-safe, like the terminal)."""

    def __init__(self, terminal: api.Terminal, clock: Callable[[], float]) -> None:
        self._terminal = terminal
        self._clock = clock
        self._calls: deque[BrokerCall] = deque(maxlen=10_000)

    def drain(self) -> list[BrokerCall]:
        """Every terminal call since the last drain, oldest first."""
        calls = list(self._calls)
        self._calls.clear()
        return calls

    def call(
        self,
        function: str,
        call: Callable[[], T],
        *,
        request: dict[str, Any] | None = None,
        failed: Callable[[T], bool] = _is_none,
    ) -> tuple[T, tuple[int, str] | None]:
        """Run one terminal call; returns (result, error). Raises TransportError through."""
        at = datetime.fromtimestamp(self._clock(), UTC)
        started = time.perf_counter()
        error: tuple[int, str] | None = None
        try:
            result = call()
        except api.TransportError as exc:
            error = (api.RES_E_INTERNAL_FAIL, f"transport error: {type(exc).__name__}")
            self._record(function, None, error, started, at, request)
            raise
        if failed(result):
            code, message = self._terminal.last_error()
            error = (int(code), str(message))
        retcode = getattr(result, "retcode", None)
        self._record(function, retcode, error, started, at, request)
        return result, error

    def _record(
        self,
        function: str,
        retcode: int | None,
        error: tuple[int, str] | None,
        started: float,
        at: datetime,
        request: dict[str, Any] | None,
    ) -> None:
        latency = (time.perf_counter() - started) * 1000
        self._calls.append(
            BrokerCall(function, retcode, error, round(latency, 3), at, dict(request or {}) or None)
        )

    def query(
        self,
        function: str,
        call: Callable[[], T],
        failed: Callable[[T], bool] = _is_none,
    ) -> tuple[T, tuple[int, str] | None]:
        """A non-send call: a lost connection raises SessionLost for the pool."""
        try:
            result, error = self.call(function, call, failed=failed)
        except api.TransportError as exc:
            raise SessionLost(f"{function}: transport error ({type(exc).__name__})") from exc
        if error is not None and error[0] in api.CONNECTION_LOST_ERRORS:
            raise SessionLost(f"{function}: connection lost ({error[0]}, {error[1]})")
        return result, error

    def require(self, function: str, call: Callable[[], T | None]) -> T:
        """A query whose None means failure (never "nothing"): raises QueryFailed, or
        SessionLost when the last answer's error says the connection is gone.

        A None is asked again up to ``QUERY_RETRIES`` times first: a read is safe to repeat,
        and a real server's None (-2, or -10005 IPC timeout with the connection up) is
        usually transient. Without the retries each one requeued the delivery (and a
        -10005 dropped the session), burning the queue's delivery limit."""
        error: tuple[int, str] | None = None
        for _ in range(1 + QUERY_RETRIES):
            try:
                result, error = self.call(function, call)
            except api.TransportError as exc:
                raise SessionLost(f"{function}: transport error ({type(exc).__name__})") from exc
            if result is not None:
                return result
        if error is not None and error[0] in api.CONNECTION_LOST_ERRORS:
            raise SessionLost(f"{function}: connection lost ({error[0]}, {error[1]})")
        raise QueryFailed(function, error)
