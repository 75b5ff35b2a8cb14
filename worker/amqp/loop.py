"""The IO thread's loop and the thread pools around it.

One IO thread runs a pika ``IOLoop`` and owns every connection and channel. Other threads
reach it only through :meth:`IoLoop.post` (``IOLoop.add_callback_threadsafe``), so slow MT5
or database calls never starve heartbeats.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pika.adapters.select_connection import IOLoop

log = logging.getLogger(__name__)


class IoLoop:
    """A pika ``IOLoop`` made on :meth:`open` (in ``run``), and the ways to schedule on it."""

    def __init__(self) -> None:
        self._ioloop: IOLoop | None = None
        self._lock = threading.Lock()  # post against open and close
        self._closed = False
        # posted before the loop opened (a confirmation the settler announces while the
        # runtime is being built): run once it opens, never dropped
        self._early: list[Callable[[], None]] = []

    @property
    def pika(self) -> IOLoop:
        assert self._ioloop is not None
        return self._ioloop

    def open(self) -> None:
        ioloop = IOLoop()
        with self._lock:
            self._ioloop = ioloop
            early, self._early = self._early, []
            for callback in early:
                ioloop.add_callback_threadsafe(callback)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.pika.close()

    def start(self) -> None:
        """Run callbacks on this thread until :meth:`stop`."""
        self.pika.start()

    def stop(self) -> None:
        self.pika.stop()

    def post(self, callback: Callable[[], None]) -> None:
        """From any thread: run ``callback`` on the IO thread; posted before :meth:`open`, it
        runs once the loop opens; dropped once the loop closed."""
        with self._lock:
            if self._closed:
                return
            if self._ioloop is None:
                self._early.append(callback)
                return
            self._ioloop.add_callback_threadsafe(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        """IO thread: run ``callback`` after ``delay`` seconds; returns a handle."""
        return self.pika.call_later(delay, callback)

    def remove_timeout(self, handle: Any) -> None:
        self.pika.remove_timeout(handle)


class Mailbox:
    """Callbacks from other threads, run on the IO thread in the order they came: one
    wake-up of the loop for all those that arrive before it gets to them."""

    def __init__(self, loop: IoLoop, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._loop = loop
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: deque[Callable[[], None]] = deque()
        self._since = 0.0  # when the oldest job still queued came

    def put(self, job: Callable[[], None]) -> None:
        """From any thread."""
        with self._lock:
            self._jobs.append(job)
            first = len(self._jobs) == 1
            if first:
                self._since = self._clock()
        if first:
            self._loop.post(self._run)

    def waiting_seconds(self) -> float:
        """How long the oldest queued job has waited (0: none). On a loop that beats, more
        than a loop turn means its wake-up was lost: the liveness probe must say so."""
        with self._lock:
            return self._clock() - self._since if self._jobs else 0.0

    def _run(self) -> None:
        with self._lock:
            jobs, self._jobs = self._jobs, deque()
        try:
            while jobs:
                jobs.popleft()()
        finally:
            if jobs:  # one raised: the rest still run, after it has propagated
                with self._lock:
                    jobs.extend(self._jobs)
                    self._jobs = jobs
                self._loop.post(self._run)


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
