"""The IO thread's loop and its mailbox: nothing posted from another thread is lost.

A worker's settler can announce a confirmation (a recovered execution settled at start)
while the AMQP runtime is being built, before its loop opens. The mailbox posts one wake-up
for all the jobs queued before the loop runs them: had that wake-up been dropped, every
later handler outcome would have waited behind it for ever (CI saw a worker consume its
prefetch and answer nothing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.amqp.loop import IoLoop, Mailbox


def _wait(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _run(loop: IoLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.start, name="io", daemon=True)
    thread.start()
    return thread


def _stop(loop: IoLoop, thread: threading.Thread) -> None:
    loop.post(loop.stop)
    thread.join(5.0)
    assert not thread.is_alive()
    loop.close()


def test_jobs_put_before_the_loop_opens_run_once_it_does_and_so_do_later_ones() -> None:
    loop = IoLoop()
    mailbox = Mailbox(loop)
    ran: list[str] = []
    mailbox.put(lambda: ran.append("announced before the loop opened"))
    mailbox.put(lambda: ran.append("queued behind it"))
    loop.open()
    thread = _run(loop)
    try:
        assert _wait(lambda: len(ran) == 2), ran
        mailbox.put(lambda: ran.append("a handler's outcome later"))
        assert _wait(lambda: len(ran) == 3), ran
    finally:
        _stop(loop, thread)
    assert ran == [
        "announced before the loop opened",
        "queued behind it",
        "a handler's outcome later",
    ]


def test_a_callback_posted_before_open_runs_in_order_before_those_posted_after() -> None:
    loop = IoLoop()
    ran: list[int] = []
    loop.post(lambda: ran.append(1))
    loop.open()
    loop.post(lambda: ran.append(2))
    thread = _run(loop)
    try:
        assert _wait(lambda: len(ran) == 2), ran
    finally:
        _stop(loop, thread)
    assert ran == [1, 2]


def test_a_post_after_close_is_dropped_quietly() -> None:
    loop = IoLoop()
    loop.open()
    loop.close()
    ran: list[int] = []
    loop.post(lambda: ran.append(1))  # a late handler thread: no error, nothing runs
    assert ran == []


def test_the_mailbox_tells_how_long_its_oldest_job_has_waited() -> None:
    now = [100.0]
    loop = IoLoop()
    mailbox = Mailbox(loop, clock=lambda: now[0])
    assert mailbox.waiting_seconds() == 0.0
    loop.open()
    mailbox.put(lambda: None)
    now[0] += 7.0
    mailbox.put(lambda: None)  # a later job does not make the wait look younger
    assert mailbox.waiting_seconds() == 7.0
    thread = _run(loop)
    try:
        assert _wait(lambda: mailbox.waiting_seconds() == 0.0)
    finally:
        _stop(loop, thread)
