"""The IO thread's loop and the thread pools around it.

One IO thread runs a pika ``IOLoop`` and owns every connection and channel. Other threads
reach it only through :meth:`IoLoop.post` (``IOLoop.add_callback_threadsafe``), so slow MT5
or database calls never starve heartbeats.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from pika.adapters.select_connection import IOLoop

log = logging.getLogger(__name__)


class IoLoop:
    """A pika ``IOLoop`` made on :meth:`open` (in ``run``), and the ways to schedule on it."""

    def __init__(self) -> None:
        self._ioloop: IOLoop | None = None
        self._open = threading.Event()

    @property
    def pika(self) -> IOLoop:
        assert self._ioloop is not None
        return self._ioloop

    def open(self) -> None:
        self._ioloop = IOLoop()
        self._open.set()

    def close(self) -> None:
        self._open.clear()
        self.pika.close()

    def start(self) -> None:
        """Run callbacks on this thread until :meth:`stop`."""
        self.pika.start()

    def stop(self) -> None:
        self.pika.stop()

    def post(self, callback: Callable[[], None]) -> None:
        """From any thread: run ``callback`` on the IO thread (dropped once the loop closed)."""
        if self._ioloop is not None and self._open.is_set():
            self._ioloop.add_callback_threadsafe(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        """IO thread: run ``callback`` after ``delay`` seconds; returns a handle."""
        return self.pika.call_later(delay, callback)

    def remove_timeout(self, handle: Any) -> None:
        self.pika.remove_timeout(handle)


class Threads:
    """A fixed set of daemon threads running submitted callables (never joined on exit)."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def close(self, wait_seconds: float = 0.0) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(wait_seconds)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:
                log.exception("background job failed")
