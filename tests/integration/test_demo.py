"""``execution-worker demo`` end to end, as the README runs it: in a vhost and a database of
its own, beside whatever else uses the broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest

from tests.integration.test_amqp_support import broker, ready_count
from worker.amqp.topology import REQUESTS_QUEUE, requests_queue_arguments


def test_the_demo_answers_every_message_and_leaves_the_brokers_worker_alone(
    new_vhost: Callable[[], str],
    new_database: Callable[[], str],
    rabbitmq_broker: Any,
    postgres_server: Any,
) -> None:
    """A worker's queue in the vhost of RABBITMQ_URL holds an approval: the demo, in a vhost
    and a database of its own (created and removed), leaves it there."""
    shared_vhost, database = new_vhost(), new_database()
    with broker(shared_vhost) as side:
        side.channel.queue_declare(
            REQUESTS_QUEUE, durable=True, arguments=requests_queue_arguments(20)
        )
        side.publish(b"{}", message_id="a-real-workers-approval")
    env = dict(os.environ)
    env.update(
        RABBITMQ_URL=shared_vhost,
        DATABASE_URL=database,
        MT5_BACKEND="bridge",  # the demo uses the simulator whatever this says
        METRICS_PORT="0",
    )
    # a broker in a container: its vhosts are made by the tests (no rabbitmqctl here)
    extra = [] if rabbitmq_broker.backend == "local" else ["--vhost-url", new_vhost()]
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--timeout", "60", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    said = re.search(r"demo: runs in vhost '([^']+)' \(([^)]+)\) and database '([^']+)'", out)
    assert said is not None, out
    own_vhost, own_database = said.group(1), said.group(3)
    assert "execution.requests of vhost" in out and "is not touched" in out
    assert ready_count(shared_vhost, REQUESTS_QUEUE) == 1  # untouched
    assert not (tmp := _databases(postgres_server.admin_url, own_database)), tmp
    if rabbitmq_broker.backend == "local":
        assert own_vhost.startswith("ew_demo_")
        with pytest.raises(pika.exceptions.AMQPConnectionError):  # deleted at the end
            pika.BlockingConnection(pika.URLParameters(rabbitmq_broker.url(own_vhost))).close()
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


def _databases(admin_url: str, name: str) -> list[str]:
    with psycopg.connect(admin_url) as conn:
        return [
            r[0]
            for r in conn.execute("SELECT datname FROM pg_database WHERE datname = %s", (name,))
        ]


def test_the_demo_fails_with_one_clear_line_when_the_broker_refuses_the_topology(
    new_vhost: Callable[[], str], new_database: Callable[[], str]
) -> None:
    url = new_vhost()
    with broker(url) as side:
        side.declare_queue(REQUESTS_QUEUE)  # a classic queue: not what the worker declares
    env = dict(os.environ, RABBITMQ_URL=url, DATABASE_URL=new_database(), METRICS_PORT="0")
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--timeout", "20", "--vhost-url", url],
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
