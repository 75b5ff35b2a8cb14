"""Fixtures: the real MetaTrader5 package over the ``_core`` double, backed by a simulator."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TypeVar

import pytest

from tests.native import core_double
from tests.native.package import over
from worker.mt5.sim.terminal import SimTerminal

T = TypeVar("T")
# a Tuesday morning with the FX market open, whatever day the tests run
OPEN_CLOCK_BASE = 1764064800.0


def open_clock() -> float:
    return OPEN_CLOCK_BASE + (time.time() % 3600)


def until(query: Callable[[], T], seconds: float = 10.0, done: Callable[[T], bool] = bool) -> T:
    """Ask again until ``done``: the hardened simulator shows a deal some hundreds of ms
    after its 10009 and answers None to some queries, as real servers do."""
    deadline = time.monotonic() + seconds
    while True:
        answer = query()
        if done(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


@pytest.fixture
def sim() -> SimTerminal:
    return SimTerminal(clock=open_clock)


@pytest.fixture
def mt5(sim: SimTerminal) -> Iterator[ModuleType]:
    """``MetaTrader5`` (the wheel's own ``__init__.py``) with ``sim`` behind it, initialized."""
    module = over(sim)
    assert module.initialize(), module.last_error()
    yield module
    core_double.bind(None)
