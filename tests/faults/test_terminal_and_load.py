"""Terminal faults from the simulator, terminal crashes, and load across processes and sessions."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import MakeEnv
from tests.faults.harness import FaultEnv, Tally, approvals, sim_toml

pytestmark = pytest.mark.faults

WAIT_SECONDS = 180.0
STORMS = """
too_many_requests_rate = 0.5  # 10024 storms: often all attempts of one order
requote_rate = 0.3            # 10004 on GBPUSD (instant execution)
"""
LOST_REPLIES = """
latency_ms = 3.0
lost_reply_rate = 0.1         # executed, reply lost: None + (-10005)
timeout_rate = 0.1            # 10012, executed anyway
no_result_rate = 0.05         # not executed, None + (-1)
"""


def _confirmed_at_least(env: FaultEnv, count: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while len(env.broker_side.confirmed_keys()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} confirmations"
        time.sleep(0.2)


def test_terminal_faults_and_crashes(make_env: MakeEnv, record: Callable[[Tally], None]) -> None:
    env = make_env([sim_toml(61, STORMS), sim_toml(62, LOST_REPLIES), sim_toml(63)])
    keys = env.publish(approvals(150, random.Random(61)))
    worker = env.start_worker()
    crashing = env.terminals[2]
    for threshold in (40, 90):
        _confirmed_at_least(env, threshold)
        crashing.kill()  # kill -9: the bridge drops mid-call, the terminal is gone
        time.sleep(2.0)
        crashing.start()  # same port, same broker state
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    tally = env.check(
        "terminal faults + terminal kill -9",
        keys,
        notes="10024 50%, requotes 30%, lost replies 10%, 10012 10%, no result 5%;"
        " one terminal killed twice",
    )
    # the faults did bite: some approvals ended without an order (storms, no result)
    refused = tally.by_state.get("REJECTED", 0) + tally.by_state.get("FAILED", 0)
    assert refused > 0 and tally.by_state.get("FILLED", 0) > 0, tally.by_state
    record(tally)


LOAD_MESSAGES = 2000
LOAD_PROCESSES = 4
LOAD_TERMINALS = 6


def test_load_2000_approvals_4_processes_6_sessions(
    make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    env = make_env([sim_toml(70 + i) for i in range(LOAD_TERMINALS)])
    keys = env.publish(approvals(LOAD_MESSAGES, random.Random(70)))
    started = time.monotonic()
    supervisor = env.start_worker(processes=LOAD_PROCESSES)
    env.wait_confirmed(keys, WAIT_SECONDS * 2, supervisor)
    elapsed = time.monotonic() - started
    assert supervisor.stop() == 0, supervisor.tail()
    terminals_used = sum(1 for terminal in env.terminals if terminal.deals())
    assert terminals_used == LOAD_TERMINALS  # every session took work
    record(
        env.check(
            f"load: {LOAD_PROCESSES} processes, {LOAD_TERMINALS} sessions",
            keys,
            notes=f"all confirmed {elapsed:.0f} s after start ({LOAD_MESSAGES / elapsed:.0f}"
            " msg/s incl. start-up, 2-core machine)",
        )
    )


DUPLICATED = 300
COPIES = 3


def test_duplicate_publishes_across_processes_send_one_order_each(
    make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    """The RPM publishes every approval three times in a row: the copies reach different
    processes at the same moment. No lock is taken before the intent, so the intent's
    primary key and the session leases alone must keep it to one order per approval."""
    env = make_env([sim_toml(80 + i) for i in range(LOAD_PROCESSES)])
    documents = approvals(DUPLICATED, random.Random(80))
    keys = env.publish([document for document in documents for _ in range(COPIES)])
    unique = list(dict.fromkeys(keys))
    assert len(unique) == DUPLICATED
    supervisor = env.start_worker(processes=LOAD_PROCESSES)
    env.wait_confirmed(unique, WAIT_SECONDS * 2, supervisor)
    # every copy is answered (the later ones with the first one's confirmation)
    deadline = time.monotonic() + WAIT_SECONDS
    while sum(len(copies) for copies in env.broker_side.collect().values()) < len(keys):
        assert time.monotonic() < deadline, "some copies were never answered"
        time.sleep(0.2)
    assert supervisor.stop() == 0, supervisor.tail()
    record(
        env.check(
            f"duplicate publishes: {COPIES} copies each, {LOAD_PROCESSES} processes",
            unique,
            notes=f"{len(keys)} deliveries of {DUPLICATED} approvals, copies back to back",
        )
    )
