"""``kill -9`` of a worker at each point of a message's path, then a normal restart.

The dying worker is the real ``execution-worker run`` started through
``tests.faults.launcher``, which makes the Nth call of one production function end the
process with ``os._exit(137)``. A normal worker is then started on the same database,
queue and terminals; the promise is checked on the broker's books, the audit table and the
confirmations.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.faults.conftest import MakeEnv
from tests.faults.harness import FaultEnv, Tally, approvals, sim_toml
from tests.faults.launcher import KILL_EXIT_CODE, POINTS

pytestmark = pytest.mark.faults

MESSAGES = 8
KILL_AT = 3  # two messages go through untouched first
WAIT_SECONDS = 90.0


def _magics_in_books(env: FaultEnv) -> set[int]:
    return {int(deal["magic"]) for deal in env.deals()}


def _evidence(env: FaultEnv, point: str, keys: list[str]) -> None:
    """What the dead worker left behind proves it died where it was told to."""
    states = {key: rows[0][0] for key, rows in env.rows().items()}
    in_flight = [k for k, s in states.items() if s in ("SUBMITTING", "SUBMITTED")]
    books = _magics_in_books(env)
    unpublished = env.query("SELECT count(*) FROM execution.outbox WHERE published_at IS NULL")
    confirmed = env.broker_side.confirmed_keys()
    if point == "after_receive":
        assert len(states) == KILL_AT - 1 and not in_flight, states
    elif point == "after_intent":
        assert len(in_flight) == 1, states
        assert env.magic_of(in_flight[0]) not in books
    elif point in ("during_order_send", "after_fill"):
        assert len(in_flight) == 1, states
        # the order is on the broker's books, the audit row does not know it yet
        assert env.magic_of(in_flight[0]) in books
    elif point == "after_commit":
        assert not in_flight and len(states) == KILL_AT and unpublished[0][0] >= 1, states
        assert len(confirmed) == KILL_AT - 1, confirmed
    elif point == "after_publish":
        assert not in_flight and len(confirmed) == KILL_AT, confirmed
    assert len(confirmed) < len(keys)


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_point(
    point: str, make_env: MakeEnv, record: Callable[[Tally], None]
) -> None:
    # one terminal, one session, no delivery parked on the settler (SETTLING_PREFETCH=0):
    # the channel's prefetch is 1, so "the Nth call" is the Nth message. With the default
    # settling prefetch, a fill waiting on its deals lets the next approval begin, and the
    # evidence below would see that one in flight (CI saw it at after_publish).
    env = make_env([sim_toml(seed=3)], settings={"SETTLING_PREFETCH": "0"})
    keys = env.publish(approvals(MESSAGES, random.Random(point)))
    dying = env.start_worker(kill_point=point, kill_at=KILL_AT)
    code = dying.wait(WAIT_SECONDS)
    assert code == KILL_EXIT_CODE, f"the worker was not killed at {point}:\n{dying.tail()}"
    _evidence(env, point, keys)

    worker = env.start_worker()
    env.wait_confirmed(keys, WAIT_SECONDS, worker)
    assert worker.stop() == 0, worker.tail()
    record(env.check(f"kill -9 {point.replace('_', ' ')}", keys, runs=1))


RANDOM_MESSAGES = 240
RANDOM_SEED = 20261125
RANDOM_MAX_KILLS = 12


def test_kill_9_at_random_points(make_env: MakeEnv, record: Callable[[Tally], None]) -> None:
    """Seeded random kill points and call numbers until every approval is settled."""
    rng = random.Random(RANDOM_SEED)
    # two sessions: kills land with two messages in flight; redeliveries after many kills
    # must not reach the poison-message limit (a setting, DELIVERY_LIMIT) of the queue
    env = make_env([sim_toml(seed=5), sim_toml(seed=6)], delivery_limit=50)
    keys = env.publish(approvals(RANDOM_MESSAGES, rng))
    kills = 0
    for _ in range(RANDOM_MAX_KILLS):
        point = rng.choice(POINTS)
        worker = env.start_worker(kill_point=point, kill_at=rng.randint(1, 40))
        try:
            env.wait_confirmed(keys, WAIT_SECONDS, worker)
            # a provisional answer is corrected once the broker shows the order
            env.wait_caught_up(keys, WAIT_SECONDS, worker)
        except AssertionError:
            if worker.alive():
                raise
            assert worker.process.returncode == KILL_EXIT_CODE, worker.tail()
            kills += 1
            continue
        assert worker.stop() == 0, worker.tail()
        break
    else:
        worker = env.start_worker()
        env.wait_confirmed(keys, WAIT_SECONDS * 2, worker)
        env.wait_caught_up(keys, WAIT_SECONDS, worker)
        assert worker.stop() == 0, worker.tail()
    assert kills >= 5, f"only {kills} kills happened: the scenario proves little"
    notes = f"seed {RANDOM_SEED}, {kills} kills"
    tally = env.check("kill -9 at random points", keys, runs=kills + 1, notes=notes, latest=True)
    record(tally)
