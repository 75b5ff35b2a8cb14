"""Issue 18 item 2: the parked lock backend killed while approvals flow.

Two real worker processes share the same bridged terminals. Each holds its sessions'
advisory locks on parked connections (``SESSION_LINGER_SECONDS`` > 0) between messages;
order_send is slow, so some sends are in flight. Meanwhile the test repeatedly ends the
PostgreSQL backends that hold the session locks (``pg_terminate_backend``), so the lock goes
and the other process may claim the session while the first still holds a lease object.
``Lease.fence()`` must refuse every send that is no longer covered by the lock: the promise
is checked on the broker's books, the audit rows and the confirmations.

Run alone: ``.venv/bin/pytest -q -p no:cacheprovider tests/faults/test_lock_fence.py``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from schemas.identity import execution_id_for
from tests.faults.conftest import MakeEnv
from tests.faults.harness import FaultEnv, Tally, approvals, sim_toml
from tests.faults.processes import WorkerProcess
from worker.pool.leases import LOCK_CLASS

pytestmark = pytest.mark.faults

MESSAGES = 36
SEED = 1802
WAIT_SECONDS = 240.0
# Kill rounds, one every 1-2 s (seeded): sparse enough that handlings between kills finish,
# bounded so that the scenario ends even if the kills would keep every lease from lasting.
KILL_ROUNDS = 20
SLOW_SEND = "latency_by_function = { order_send = 400.0 }  # ms: sends are in flight\n"
SETTINGS = {
    # a released lease stays parked (its connection keeps the lock) well past the next claim
    "SESSION_LINGER_SECONDS": "3",
    # every kill may requeue a message; the poison limit must not end the scenario
    "DELIVERY_LIMIT": "60",
}
# The backends holding a session lock (a two-int advisory lock: classid = key1) in the
# scenario's own database (pg_locks.database is the lock's database).
_LOCK_HOLDERS_SQL = (
    "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND classid = %s::oid"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_TERMINATE_SQL = "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid"


def _kill_lock_backends(env: FaultEnv) -> int:
    """End every backend holding a session lock now; return how many were ended."""
    pids = [int(row[0]) for row in env.query(_LOCK_HOLDERS_SQL, LOCK_CLASS)]
    if not pids:
        return 0
    return sum(1 for (ended,) in env.query(_TERMINATE_SQL, pids) if ended)


def _log_count(workers: list[WorkerProcess], message: str) -> int:
    """Lines of the workers' logs that contain ``message``."""
    return sum(worker.log_path.read_text(errors="replace").count(message) for worker in workers)


@pytest.mark.parametrize("group_commit", [False, True], ids=["own", "grouped"])
def test_parked_lock_backend_killed(
    make_env: MakeEnv,
    record: Callable[[Tally], None],
    note: Callable[[str], None],
    group_commit: bool,
) -> None:
    """``grouped``: GROUP_COMMIT=true, the intents and finals commit on the group's own
    connections, fenced by the lock check in their statements."""
    rng = random.Random(SEED)
    settings = {**SETTINGS, "GROUP_COMMIT": "true" if group_commit else "false"}
    env = make_env(
        [sim_toml(181, SLOW_SEND), sim_toml(182, SLOW_SEND)],
        delivery_limit=int(SETTINGS["DELIVERY_LIMIT"]),
        settings=settings,
    )
    keys = env.publish(approvals(MESSAGES, rng))
    wanted = {str(execution_id_for(key)) for key in keys}
    workers = [env.start_worker(), env.start_worker()]  # two processes, the same sessions

    kills = rounds = 0
    deadline = time.monotonic() + WAIT_SECONDS
    while not wanted <= env.broker_side.confirmed_keys():
        assert time.monotonic() < deadline, (
            f"timed out: {len(wanted - env.broker_side.confirmed_keys())} approvals"
            f" unanswered after {kills} kills\n{workers[0].tail()}\n{workers[1].tail()}"
        )
        for worker in workers:
            assert worker.alive(), f"worker exited {worker.process.returncode}:\n{worker.tail()}"
        if rounds < KILL_ROUNDS:
            kills += _kill_lock_backends(env)
            rounds += 1
            time.sleep(rng.uniform(1.0, 2.0))
        else:
            time.sleep(0.25)

    for worker in workers:
        assert worker.stop() == 0, worker.tail()
    # a killed lock connection is noticed at its next statement: the fence before a send or
    # a grouped commit's lock check (LeaseLost), or a commit through the lease's connection
    # (requeued as a database error)
    fenced = _log_count(workers, "session lease lost, requeued")
    database = _log_count(workers, "database unavailable, requeued")
    tally = env.check(
        "parked lock backend killed" + (" (GROUP_COMMIT=true)" if group_commit else ""),
        keys,
        runs=1,
        notes=f"2 worker processes on the same 2 sessions, SESSION_LINGER_SECONDS=3,"
        f" order_send 400 ms{', GROUP_COMMIT=true' if group_commit else ''};"
        f" {kills} lock-holding backends terminated in {rounds} rounds;"
        f" {fenced} handlings refused by the fence, {database} requeued on a lost"
        " lock connection",
    )
    # the scenario proves something only if locks were really taken away under the workers
    assert kills >= 5, f"only {kills} lock backends were terminated"
    # A lock lost between an intent's commit and the fence of its first send: nothing was
    # sent, but the row (SUBMITTING) cannot prove that to the handling that finds it, so
    # the answer is UNKNOWN, provisional, and no order is sent for it. Only the fence's
    # refusals can leave such a row; each of them is a lone order-less execution.
    unknown = tally.by_state.get("UNKNOWN", 0)
    assert tally.by_state == {
        "FILLED": MESSAGES - unknown,
        **({"UNKNOWN": unknown} if unknown else {}),
    }
    assert unknown <= fenced, (unknown, fenced)
    assert tally.orders == MESSAGES - unknown, "an UNKNOWN execution has an order on the books"
    note(
        "parked lock backend killed: every 1-2 s (seeded), 20 times at most, the test runs"
        " pg_terminate_backend on each backend holding a session lock (pg_locks: advisory,"
        " classid 1, the scenario's database), parked or in use, while the approvals are handled"
    )
    record(tally)
