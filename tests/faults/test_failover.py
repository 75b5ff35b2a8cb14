"""Lose a node of either engine under a running worker: nothing lost, nothing sent twice.

- a 3-node RabbitMQ cluster: the quorum leader of ``execution.requests`` is killed
  mid-stream, then a second node. Two of three down is a lost majority: the quorum queue
  stops serving (RabbitMQ docs, "Quorum Queues", "Availability"), and the right thing for
  the worker is to wait, neither losing nor duplicating; a node started again restores the
  majority and the stream completes;
- a PostgreSQL primary with a synchronous standby: the primary is killed and the standby
  promoted mid-stream; no commit is lost;
- the same with an asynchronous standby that missed the last commits (its WAL receiver
  stopped before them), with a worker killed (``kill -9`` at its order_send) on
  top: its intents are gone from the new primary while its orders are on the broker's
  books; their redeliveries look new, and the worker asks the broker by magic before
  sending (worker/execution/failover.py).

The worker is the real ``execution-worker run`` with ``RABBITMQ_URL`` naming the three
nodes, or ``DATABASE_URL`` naming both PostgreSQL hosts (``target_session_attrs=
read-write``). How long it took to resume is measured (not asserted) and written into the
results table.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker  # type: ignore[import-untyped]
import pytest

from tests.clusters import PostgresPair, RabbitCluster
from tests.conftest import POSTGRES_IMAGE, RABBITMQ_IMAGE, in_ci
from tests.containers import docker_engine_problem
from tests.faults.harness import FaultEnv, Tally, approvals, fault_env, sim_toml
from tests.faults.launcher import KILL_EXIT_CODE
from worker.amqp.topology import REQUESTS_QUEUE

pytestmark = pytest.mark.faults

MESSAGES = 240
WAIT_SECONDS = 240.0
QUORUM_LOST_SECONDS = 10.0
RABBIT_MESSAGES = 300  # enough left when the second node dies (the worker is quick)


def _images_or_skip() -> None:
    problem = docker_engine_problem()
    if problem is None:
        client = docker.from_env(timeout=10)
        try:
            for image in (RABBITMQ_IMAGE, POSTGRES_IMAGE):
                try:
                    client.images.get(image)
                except docker.errors.ImageNotFound:
                    problem = f"image {image} is not built here (deploy/images/build-local.sh)"
        finally:
            client.close()
    if problem is not None:
        if in_ci():
            pytest.fail(f"CI=true requires the cluster containers: {problem}")
        pytest.skip(problem)


@pytest.fixture
def rabbit_cluster() -> Iterator[RabbitCluster]:
    _images_or_skip()
    cluster = RabbitCluster(RABBITMQ_IMAGE)
    try:
        yield cluster
    finally:
        if not os.environ.get("HA_KEEP_CLUSTER"):  # debugging: keep it to look inside
            cluster.close()


@contextlib.contextmanager
def _pair(synchronous: bool) -> Iterator[PostgresPair]:
    _images_or_skip()
    pair = PostgresPair(POSTGRES_IMAGE, synchronous=synchronous)
    try:
        yield pair
    finally:
        pair.close()


def _count(env: FaultEnv) -> int:
    return len(env.broker_side.confirmed_keys())


def _at_least(env: FaultEnv, count: int, worker: object | None = None) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while _count(env) < count:
        assert time.monotonic() < deadline, f"fewer than {count} confirmations"
        time.sleep(0.2)


def _resumed_after(env: FaultEnv, since: float, baseline: int, total: int = MESSAGES) -> float:
    """Seconds from ``since`` until a new confirmation arrives (measured, not judged);
    ``baseline``: the count before the fault (taken while the worker could not confirm)."""
    _at_least(env, min(baseline + 1, total))
    return time.monotonic() - since


def _log_of(env: FaultEnv) -> str:
    return "".join(
        Path(path).read_text(errors="replace")
        for path in sorted(env.directory.glob("worker-*.log"))
    )


def _node_of(log: str, cluster: RabbitCluster) -> int:
    """The index of the node the worker last connected to (from its log)."""
    found = re.findall(r"connected to RabbitMQ node 127\.0\.0\.1:(\d+)", log)
    return cluster.ports.index(int(found[-1]))


def test_rabbitmq_cluster_loses_the_quorum_leader_then_a_second_node(
    rabbit_cluster: RabbitCluster,
    new_database: Callable[[], str],
    tmp_path: Path,
    record: Callable[[Tally], None],
) -> None:
    rng = random.Random(2701)
    with fault_env(
        rabbit_cluster.url,
        new_database(),
        tmp_path,
        [sim_toml(seed=2701), sim_toml(seed=2702)],
        quorum_observer=True,
    ) as env:
        keys = env.publish(approvals(RABBIT_MESSAGES, rng))
        worker = env.start_worker()
        leader = rabbit_cluster.leader_of(REQUESTS_QUEUE)
        _at_least(env, 40)

        killed_at, baseline = time.monotonic(), _count(env)
        rabbit_cluster.kill(leader)
        first = _resumed_after(env, killed_at, baseline, RABBIT_MESSAGES)
        assert worker.alive(), worker.tail()

        _at_least(env, 100)
        # the node the worker is on now (it must move), or else the new leader
        on = _node_of(_log_of(env), rabbit_cluster)
        second = on if on != leader else rabbit_cluster.leader_of(REQUESTS_QUEUE)
        assert second != leader
        rabbit_cluster.kill(second)  # one node of three left: no majority, the queue waits
        time.sleep(QUORUM_LOST_SECONDS)
        assert worker.alive(), worker.tail()
        # nothing is read from the cluster while it has no majority (a quorum queue's
        # basic.get would wait for it): the count of before the second kill is the baseline
        baseline = len(env.broker_side.received)
        assert baseline < RABBIT_MESSAGES, "all confirmed before the second kill: nothing proven"
        restored_at = time.monotonic()
        rabbit_cluster.start(leader)  # two of three: the majority is back
        third = _resumed_after(env, restored_at, baseline, RABBIT_MESSAGES)

        env.wait_confirmed(keys, WAIT_SECONDS, worker)
        env.wait_caught_up(keys, WAIT_SECONDS, worker)
        assert worker.stop() == 0, worker.tail()
        assert len(env.workers) == 1  # the one worker found the other nodes by itself
        log = _log_of(env)
        assert log.count("connected to RabbitMQ node") >= 2, log[-3000:]
        notes = (
            f"leader killed at 40+: resumed in {first:.1f} s; the new leader killed at 100+:"
            f" quorum lost, the worker waited {QUORUM_LOST_SECONDS:.0f} s; a node restarted:"
            f" resumed in {third:.1f} s"
        )
        record(env.check("RabbitMQ cluster: quorum leader, then a 2nd node", keys, notes=notes))


def test_postgresql_primary_killed_synchronous_standby_promoted(
    new_vhost: Callable[[], str],
    tmp_path: Path,
    record: Callable[[Tally], None],
) -> None:
    rng = random.Random(2711)
    with (
        _pair(synchronous=True) as pair,
        fault_env(
            new_vhost(), pair.url, tmp_path, [sim_toml(seed=2711), sim_toml(seed=2712)]
        ) as env,
    ):
        keys = env.publish(approvals(MESSAGES, rng))
        worker = env.start_worker()
        _at_least(env, 80)
        confirmed = env.broker_side.confirmed_keys()
        killed_at, baseline = time.monotonic(), _count(env)
        pair.kill_primary()
        pair.promote()
        promoted_in = time.monotonic() - killed_at
        resumed = _resumed_after(env, killed_at, baseline)

        env.wait_confirmed(keys, WAIT_SECONDS, worker)
        env.wait_caught_up(keys, WAIT_SECONDS, worker)
        assert worker.stop() == 0, worker.tail()
        assert len(env.workers) == 1
        assert pair.timeline(1) == 2
        # the worker saw the switch, and it is on record for workers started later
        assert "database switched to a new primary" in _log_of(env)
        epochs = env.query("SELECT timeline FROM execution.database_epochs ORDER BY timeline")
        assert [row[0] for row in epochs] == [1, 2], epochs
        # synchronous: everything confirmed before the kill is on the new primary
        rows = env.rows()
        missing = [key for key in keys if _id(key) in confirmed and not rows.get(key)]
        assert not missing, missing
        notes = (
            f"killed at 80+, promoted {promoted_in:.1f} s later; resumed"
            f" {resumed:.1f} s after the kill"
        )
        record(env.check("PostgreSQL failover, synchronous standby", keys, notes=notes))


def _id(key: str) -> str:
    from schemas.identity import execution_id_for

    return str(execution_id_for(key))


KILL_AT = 110  # the dying worker's 110th order_send
DETACH_AT = 90  # confirmations before the standby stops receiving WAL


def test_postgresql_asynchronous_standby_loses_the_last_commits_with_a_worker_killed(
    new_vhost: Callable[[], str],
    tmp_path: Path,
    record: Callable[[Tally], None],
) -> None:
    rng = random.Random(2721)
    with (
        _pair(synchronous=False) as pair,
        fault_env(
            new_vhost(), pair.url, tmp_path, [sim_toml(seed=2721), sim_toml(seed=2722)]
        ) as env,
    ):
        keys = env.publish(approvals(MESSAGES, rng))
        dying = env.start_worker(kill_point="during_order_send", kill_at=KILL_AT)
        _at_least(env, 30)
        assert pair.caught_up()
        _at_least(env, DETACH_AT)
        pair.detach_standby()  # from here the primary's commits exist on the primary only
        assert dying.wait(WAIT_SECONDS) == KILL_EXIT_CODE, dying.tail()
        confirmed_before = env.broker_side.confirmed_keys()
        killed_at = time.monotonic()
        pair.kill_primary()
        pair.promote()
        promoted_in = time.monotonic() - killed_at

        started_at = time.monotonic()
        worker = env.start_worker()
        resumed = _resumed_after(env, started_at, len(confirmed_before))
        env.wait_confirmed(keys, WAIT_SECONDS, worker)
        env.wait_caught_up(keys, WAIT_SECONDS, worker)
        assert worker.stop() == 0, worker.tail()

        rows = env.rows()
        # the commits made after the standby was detached are gone: the rows of approvals
        # confirmed (and acked) in that window, and the dying worker's intents
        lost_rows = {k for k in keys if not rows.get(k)}
        assert lost_rows, "the failover lost no commit: the scenario proves little"
        assert all(_id(k) in confirmed_before for k in lost_rows), "a row lost, unconfirmed"
        # the dying worker's orders were on the books without their rows: found by magic
        assert "on the broker's books" in _log_of(env), _log_of(env)[-3000:]
        notes = (
            f"standby detached at {DETACH_AT}+, worker killed at its {KILL_AT}th order_send,"
            f" primary killed, standby promoted {promoted_in:.1f} s later; a new worker"
            f" confirmed again {resumed:.1f} s after its start; {len(lost_rows)} audit rows"
            " lost with the commits (their confirmations were out before the switch)"
        )
        record(
            env.check(
                "PostgreSQL failover, asynchronous standby + kill -9",
                keys,
                notes=notes,
                rows_lost_to_failover=lost_rows,
                answered_again={k for k in keys if _id(k) in confirmed_before},
            )
        )


def test_both_engines_lose_a_node_one_after_the_other_under_steady_traffic(
    rabbit_cluster: RabbitCluster,
    tmp_path: Path,
    record: Callable[[Tally], None],
) -> None:
    """The compose HA profile's topology under demo-like traffic (approvals published in
    batches while the worker runs): the RabbitMQ node the worker is on is stopped, then
    the PostgreSQL primary, and its synchronous standby promoted."""
    rng = random.Random(2731)
    with (
        _pair(synchronous=True) as pair,
        fault_env(
            rabbit_cluster.url,
            pair.url,
            tmp_path,
            [sim_toml(seed=2731), sim_toml(seed=2732)],
            quorum_observer=True,
        ) as env,
    ):
        worker = env.start_worker()
        keys: list[str] = []
        timings: dict[str, float] = {}
        for batch in range(6):
            keys += env.publish(approvals(40, rng))
            _at_least(env, len(keys) - 20)
            if batch == 1:
                on = _node_of(_log_of(env), rabbit_cluster)
                stopped_at, baseline = time.monotonic(), _count(env)
                rabbit_cluster.stop(on)
                timings["rabbitmq"] = _resumed_after(env, stopped_at, baseline, len(keys))
            elif batch == 3:
                stopped_at, baseline = time.monotonic(), _count(env)
                pair.stop_primary()
                pair.promote()
                timings["postgres"] = _resumed_after(env, stopped_at, baseline, len(keys))
        env.wait_confirmed(keys, WAIT_SECONDS, worker)
        env.wait_caught_up(keys, WAIT_SECONDS, worker)
        assert worker.stop() == 0, worker.tail()
        assert len(env.workers) == 1
        assert "database switched to a new primary" in _log_of(env)
        notes = (
            f"RabbitMQ node under the worker stopped at 80: resumed in"
            f" {timings['rabbitmq']:.1f} s; PostgreSQL primary stopped at 160 and the"
            f" synchronous standby promoted: resumed in {timings['postgres']:.1f} s"
        )
        record(
            env.check(
                "HA topology: a RabbitMQ node, then the PostgreSQL primary", keys, notes=notes
            )
        )
