"""``execution-worker demo`` end to end, as the README runs it (fresh vhost and database)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

from tests.integration.test_amqp_support import broker
from worker.amqp.topology import REQUESTS_QUEUE


def test_the_demo_answers_every_message_and_exits_0(
    new_vhost: Callable[[], str], new_database: Callable[[], str]
) -> None:
    env = dict(os.environ)
    env.update(
        RABBITMQ_URL=new_vhost(),
        DATABASE_URL=new_database(),
        MT5_BACKEND="bridge",  # the demo uses the simulator whatever this says
        METRICS_PORT="0",
    )
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    lines = out.splitlines()
    table = [
        line
        for line in lines
        if line.split(" ")[0] in {"FILLED", "PARTIALLY_FILLED", "REJECTED", "DEAD-LETTERED"}
    ]
    assert len(table) == 12, out
    assert "all 12 messages answered" in out, out
    assert any(line.startswith("PARTIALLY_FILLED") and "GBPUSD" in line for line in table), out
    assert any("KILL_SWITCH" in line for line in table), out
    assert any("INVALID_REQUEST" in line for line in table), out
    assert any(line.startswith("DEAD-LETTERED") for line in table), out
    assert any("second delivery: same confirmation" in line for line in table), out
    symbols = {line.split()[1] for line in table if line.startswith("FILLED")}
    assert {"USDJPY", "XAUUSD", "EURUSD"} <= symbols, out
    assert "guest:guest" not in out + done.stderr  # URLs are masked


def test_the_demo_fails_with_one_clear_line_when_the_broker_refuses_the_topology(
    new_vhost: Callable[[], str], new_database: Callable[[], str]
) -> None:
    url = new_vhost()
    with broker(url) as side:
        side.declare_queue(REQUESTS_QUEUE)  # a classic queue: not what the worker declares
    env = dict(os.environ, RABBITMQ_URL=url, DATABASE_URL=new_database(), METRICS_PORT="0")
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78  # ExitCode.TOPOLOGY_MISMATCH
    assert "execution-worker demo: queue 'execution.requests' exists with a different" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
