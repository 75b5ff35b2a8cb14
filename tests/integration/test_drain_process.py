"""A rollout drains an order in flight: SIGTERM while ``order_send`` is slow.

The order must be finished, committed and its confirmation published by the stopping
worker itself, not requeued and left for recovery. ``order_send`` takes longer than the old
fixed 30 s drain, so with that default the delivery was requeued mid-order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_amqp_support import broker, ready_count, wait_until
from tests.integration.test_runtime_e2e import SIM_CONFIG, approval
from tests.integration.test_runtime_process import has_queue, processes, rows, start  # noqa: F401
from worker.amqp.topology import REQUESTS_QUEUE
from worker.config import load_settings

pytestmark = pytest.mark.integration

# longer than the old fixed drain (30 s), shorter than the derived default (100 s)
ORDER_SEND_MS = 32_000.0


def slow_env(
    new_vhost: Callable[[], str], new_database: Callable[[], str], tmp_path: Path
) -> dict[str, str]:
    sim = tmp_path / "sim.toml"
    sim.write_text(SIM_CONFIG + f"\n[faults.latency_by_function]\norder_send = {ORDER_SEND_MS}\n")
    sessions = tmp_path / "sessions.toml"
    sessions.write_text(f'[[sessions]]\nid = "sim-slow"\nbackend = "sim"\nsim_config = "{sim}"\n')
    env = {k: v for k, v in os.environ.items() if k != "DRAIN_TIMEOUT_SECONDS"}
    env.update(
        RABBITMQ_URL=new_vhost(),
        DATABASE_URL=new_database(),
        MT5_SESSIONS=str(sessions),
        METRICS_PORT="0",
        LOG_FORMAT="console",
    )
    return env


def test_sigterm_waits_for_a_slow_order_and_publishes_its_confirmation(
    new_vhost: Callable[[], str],
    new_database: Callable[[], str],
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],  # noqa: F811
) -> None:
    env = slow_env(new_vhost, new_database, tmp_path)
    # the worker's own default drain, as a rollout gets it
    assert load_settings(env).drain_timeout_seconds > ORDER_SEND_MS / 1000
    url = env["RABBITMQ_URL"]
    worker = start(env)
    processes.append(worker)
    document = approval("EURUSD", 1, 10_000.0)
    order_id = document["decision"]["order_id"]
    wait_until(lambda: has_queue(url), "the worker to consume")
    with broker(url) as side:
        side.bind_confirmations("observer")
        side.publish(json.dumps(document).encode(), message_id=order_id)
        # the intent row is committed before order_send: the order is now in flight
        wait_until(lambda: rows(env) == [("SUBMITTING", False)], "the order to be in flight")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(ORDER_SEND_MS / 1000 + 60)
        stderr = worker.stderr.read().decode() if worker.stderr else ""
        assert code == 0, stderr
        assert "drain timeout" not in stderr
        # finished and confirmed by this worker: nothing requeued, nothing left to recover
        assert rows(env) == [("FILLED", True)]
        assert ready_count(url, REQUESTS_QUEUE) == 0
        (confirmation,) = side.take("observer", 1)
    assert confirmation.properties.correlation_id == order_id
    assert json.loads(confirmation.body)["status"] == "FILLED"
