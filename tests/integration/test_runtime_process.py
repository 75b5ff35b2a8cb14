"""``execution-worker run`` as a real process: SIGTERM mid-batch, and the N-process supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from schemas.identity import execution_id_for
from tests.integration.test_amqp_support import broker, ready_count, settled_ready, wait_until
from tests.integration.test_runtime_e2e import SIM_CONFIG, approval
from worker.amqp.topology import REQUESTS_QUEUE

TERMINAL = ("FILLED", "PARTIALLY_FILLED", "REJECTED", "EXPIRED", "CANCELLED", "FAILED")


@pytest.fixture
def worker_env(
    new_vhost: Callable[[], str], new_database: Callable[[], str], tmp_path: Path
) -> dict[str, str]:
    sim = tmp_path / "sim.toml"
    sim.write_text(SIM_CONFIG + "\n[faults.latency_by_function]\norder_send = 40.0\n")
    sessions = tmp_path / "sessions.toml"
    sessions.write_text(
        "".join(
            f'[[sessions]]\nid = "sim-{i}"\nbackend = "sim"\nsim_config = "{sim}"\n'
            for i in range(2)
        )
    )
    env = dict(os.environ)
    env.update(
        RABBITMQ_URL=new_vhost(),
        DATABASE_URL=new_database(),
        MT5_SESSIONS=str(sessions),
        METRICS_PORT="0",
        LOG_FORMAT="console",
        DRAIN_TIMEOUT_SECONDS="20",
    )
    return env


def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "worker.cli", "run", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def consumers(url: str) -> int:
    with broker(url) as side:
        count: int = side.channel.queue_declare(REQUESTS_QUEUE, passive=True).method.consumer_count
        return count


def has_queue(url: str) -> bool:
    try:
        return consumers(url) > 0
    except Exception:
        return False


def rows(env: dict[str, str]) -> list[tuple[str, bool]]:
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute(
            "SELECT e.state, o.published_at IS NOT NULL FROM execution.executions e "
            "LEFT JOIN execution.outbox o USING (execution_id)"
        ).fetchall()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:  # a failed test must not leave workers behind
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigterm_mid_batch_loses_nothing_and_doubles_nothing(
    worker_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    url = worker_env["RABBITMQ_URL"]
    first = start(worker_env)
    processes.append(first)
    wait_until(lambda: has_queue(url), "the worker to consume")
    documents = [approval("EURUSD", 1 if i % 2 else -1, 10_000.0 + i) for i in range(40)]
    with broker(url) as side:
        side.bind_confirmations("observer")  # confirmations need a route, or requests wait
        for document in documents:
            order_id = document["decision"]["order_id"]
            side.publish(json.dumps(document).encode(), message_id=order_id)
    wait_until(lambda: len(rows(worker_env)) >= 4, "a few executions")
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0, first.stderr.read().decode() if first.stderr else ""
    done = rows(worker_env)
    # drained: whatever was started is finished, committed, published (and so acked)
    assert all(state in TERMINAL and published for state, published in done)
    assert len(done) < 40, "SIGTERM came too late to be mid-batch"
    settled_ready(url, REQUESTS_QUEUE, 40 - len(done))

    second = start(worker_env)
    processes.append(second)
    wait_until(lambda: len(rows(worker_env)) == 40, "the rest to be executed")
    wait_until(lambda: all(p for _, p in rows(worker_env)), "every confirmation published")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert ready_count(url, REQUESTS_QUEUE) == 0
    with psycopg.connect(worker_env["DATABASE_URL"], autocommit=True) as conn:
        ids = {row[0] for row in conn.execute("SELECT execution_id FROM execution.executions")}
    assert ids == {execution_id_for(d["decision"]["order_id"]) for d in documents}


def test_the_supervisor_restarts_a_dead_worker_and_forwards_sigterm(
    worker_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    url = worker_env["RABBITMQ_URL"]
    supervisor = start(worker_env, "--processes", "2")
    processes.append(supervisor)
    parent = psutil.Process(supervisor.pid)
    wait_until(lambda: has_queue(url) and consumers(url) == 2, "two consuming workers")
    victim = parent.children()[0]
    victim.kill()
    wait_until(
        lambda: (
            len(parent.children()) == 2 and victim.pid not in {c.pid for c in parent.children()}
        ),
        "a replacement worker",
    )
    wait_until(lambda: consumers(url) == 2, "the replacement to consume")
    documents = [approval("EURUSD", 1, 10_000.0) for _ in range(10)]
    with broker(url) as side:
        side.bind_confirmations("observer")
        for document in documents:
            side.publish(json.dumps(document).encode(), message_id=document["decision"]["order_id"])
    wait_until(lambda: len(rows(worker_env)) == 10, "ten executions")
    wait_until(lambda: all(p for _, p in rows(worker_env)), "every confirmation published")
    children = parent.children()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    assert not any(child.is_running() and child.status() != "zombie" for child in children)


def test_a_topology_mismatch_is_not_a_crash_loop(
    worker_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    with broker(worker_env["RABBITMQ_URL"]) as side:
        side.declare_queue(REQUESTS_QUEUE)  # a classic queue from an older deployment
    supervisor = start(worker_env, "--processes", "2")
    processes.append(supervisor)
    assert supervisor.wait(60) == 78
    assert supervisor.stderr is not None
    error = supervisor.stderr.read().decode()
    assert "queue 'execution.requests' exists with a different x-" in error
