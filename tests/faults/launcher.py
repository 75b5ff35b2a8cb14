"""``python -m tests.faults.launcher run ...``: the real worker, killed (exit 137) at one point.

No test hook lives in production code: this launcher wraps one production function before
handing over to ``worker.cli.main``, and the wrapper calls ``os._exit(137)`` (what a
``kill -9`` leaves behind: no finally blocks, no flush, sockets closed by the kernel) on the
Nth call. ``FAULT_KILL_POINT`` names the point (see ``POINTS``), ``FAULT_KILL_AT`` the N
(1-based, counted across all threads of the process). Without ``FAULT_KILL_POINT`` it is
just ``execution-worker``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

KILL_EXIT_CODE = 137
POINT_ENV = "FAULT_KILL_POINT"
AT_ENV = "FAULT_KILL_AT"
# Where the worker dies, in the order a message meets them.
POINTS = (
    "after_receive",  # the handler got the delivery; nothing done
    "after_intent",  # the intent row (SUBMITTING) is committed; no order sent
    "during_order_send",  # the order left for the terminal; the reply is never read
    "after_fill",  # the broker filled; the final row is not committed
    "after_commit",  # final row + outbox committed; nothing published
    "after_publish",  # the confirmation is confirmed by RabbitMQ; the request is not acked
)
# How long the dying worker waits after its order_send request left, so that the terminal
# has surely executed it: the reply is lost, the order is real.
ORDER_SEND_GRACE_SECONDS = 0.3


class Trigger:
    """Counts calls at the chosen point; the Nth one kills the process."""

    def __init__(self, at: int) -> None:
        self._at = at
        self._calls = 0
        self._lock = threading.Lock()

    def hit(self) -> bool:
        with self._lock:
            self._calls += 1
            return self._calls == self._at


def die() -> None:
    # stderr is unbuffered: the test log shows where the worker died
    sys.stderr.write(f"fault launcher: killed at {os.environ.get(POINT_ENV)}\n")
    os._exit(KILL_EXIT_CODE)


def _before(owner: Any, name: str, trigger: Trigger, when: Callable[..., bool] | None) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if (when is None or when(*args, **kwargs)) and trigger.hit():
            die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _after(owner: Any, name: str, trigger: Trigger) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if trigger.hit():
            die()
        return result

    setattr(owner, name, wrapper)


def _during_order_send(trigger: Trigger) -> None:
    from worker.mt5.bridge.client import BridgeConnection

    original = BridgeConnection.call

    def call(
        self: BridgeConnection,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> tuple[Any, tuple[int, str]]:
        if name == "order_send" and trigger.hit():
            if not self.connected:
                self.connect()
            channel = self._channel
            assert channel is not None

            def recv_then_die() -> dict[str, Any]:
                time.sleep(ORDER_SEND_GRACE_SECONDS)
                die()
                raise AssertionError("unreachable")

            channel.recv = recv_then_die  # type: ignore[method-assign]
        return original(self, name, args, kwargs)

    BridgeConnection.call = call  # type: ignore[method-assign]


def install(point: str, at: int) -> None:
    """Arm the kill at ``point`` on its ``at``-th call."""
    from worker.amqp.deliveries import Deliveries
    from worker.execution.pipeline import Pipeline
    from worker.store.store import Store

    trigger = Trigger(at)
    if point == "after_receive":
        _before(Pipeline, "handle", trigger, None)
    elif point == "after_intent":
        _after(Store, "insert_intent", trigger)
    elif point == "during_order_send":
        _during_order_send(trigger)
    elif point == "after_fill":
        _before(Store, "finish", trigger, None)
    elif point == "after_commit":
        _after(Store, "finish", trigger)
    elif point == "after_publish":
        _before(Deliveries, "settle", trigger, lambda *_a, ack, **_k: bool(ack))
    else:
        raise SystemExit(f"fault launcher: unknown {POINT_ENV}={point!r}; one of {POINTS}")


def main(argv: list[str]) -> int:
    point = os.environ.get(POINT_ENV)
    if point:
        install(point, int(os.environ.get(AT_ENV, "1")))
    from worker.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
