"""Every alert and dashboard expression reads series a running worker really exports.

A real ``execution-worker run`` process executes approvals on the simulator (a fill with
slippage, a refusal, an unparsable request); its ``/metrics`` is scraped over HTTP and every
metric name in deploy/prometheus/alerts.yml and the Grafana dashboard must be among the
names that exposition carries (or, for a labelled family without samples yet, will carry).
The bridge's own series (``mt5_bridge_*``) come from a running ``sim-terminal
--metrics-port``, which serves the same bridge code as ``bridge-serve``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_amqp_support import broker, wait_until
from tests.integration.test_bridge_helpers import new_secret, start_sim_terminal
from tests.integration.test_runtime_e2e import approval
from tests.integration.test_runtime_process import (  # noqa: F401
    has_queue,
    processes,
    rows,
    start,
    worker_env,
)
from tests.unit.test_alerts import exported_series, referenced_series
from worker.mt5 import api
from worker.mt5.bridge.client import BridgeTerminal

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text: str = reply.read().decode()
        return text


def bridge_exposition(tmp_path: Path) -> str:
    """A sim-terminal's /metrics after one served call and one refused handshake."""
    secret = new_secret()
    bridge = start_sim_terminal(
        tmp_path, tmp_path / "bridge.state", secret, args=["--metrics-port", "0"]
    )
    try:
        terminal = BridgeTerminal(bridge.address, secret, timeout=10)
        assert terminal.initialize() and terminal.account_info() is not None
        intruder = BridgeTerminal(bridge.address, new_secret(), timeout=10)
        with contextlib.suppress(api.TransportError):  # refused: an error or a False
            assert not intruder.initialize()
        assert bridge.metrics_address is not None
        with urllib.request.urlopen(f"http://{bridge.metrics_address}/metrics", timeout=10) as r:
            text: str = r.read().decode()
        return text
    finally:
        bridge.kill()


def test_alerts_and_dashboard_read_what_a_running_worker_exports(
    worker_env: dict[str, str],  # noqa: F811
    processes: list[subprocess.Popen[bytes]],  # noqa: F811
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {**worker_env, "METRICS_PORT": str(port)}
    url = env["RABBITMQ_URL"]
    worker = start(env)
    processes.append(worker)
    wait_until(lambda: has_queue(url), "the worker to consume")
    documents = [
        approval("EURUSD", 1, 10_000.0),
        approval("EURUSD", -1, 10_000.0, kill_switch=True),
    ]
    with broker(url) as side:
        side.bind_confirmations("observer")
        for document in documents:
            side.publish(json.dumps(document).encode(), message_id=document["decision"]["order_id"])
        side.publish(b"not json at all")  # no key: dead-lettered
        side.take("observer", 2)
    wait_until(lambda: len(rows(env)) == 2 and all(p for _, p in rows(env)), "both confirmed")

    exposition = scrape(port)
    exported = exported_series(exposition) | exported_series(bridge_exposition(tmp_path))
    unknown = {where: names - exported for where, names in referenced_series().items()}
    assert not {where: names for where, names in unknown.items() if names}

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    names = {name for name, _ in samples}
    # a fill was observed, and the negative-bucket histogram still has no _sum
    assert "execution_worker_slippage_pips_count" in names
    assert "execution_worker_slippage_pips_sum" not in names
    assert "execution_worker_end_to_end_seconds_sum" in names
    # the series the new alerts read
    assert samples[("execution_worker_ready", ())] == 1
    sessions = {labels for name, labels in samples if name == "execution_worker_sessions_unhealthy"}
    assert sessions == {(("session", "sim-0"),), (("session", "sim-1"),)}
    assert samples[("execution_worker_executions_in_flight", ())] == 0
    dead = [v for (name, _), v in samples.items() if name == "execution_worker_dead_lettered_total"]
    assert sum(dead) == 1
