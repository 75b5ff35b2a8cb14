"""With PROMETHEUS_MULTIPROC_DIR, child processes' metrics merge into one exposition."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from worker.observability.health import HealthServer

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from worker.observability import metrics
metrics.record_outcome("FILLED")
metrics.record_slippage("EURUSD", 1, 0.3)
metrics.in_flight(int(sys.argv[1]))
metrics.register_pool_state(lambda: metrics.PoolState(size=2, in_use=1, unhealthy=0))
metrics.register_outbox_state(lambda: metrics.OutboxState(5, 9.0))
metrics.refresh()
import os; print(os.getpid())
"""


def _run_child(directory: Path, in_flight: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(in_flight)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(done.stdout.strip())


def _scrape(server: HealthServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_two_processes_merge_counters_and_live_gauges(tmp_path: Path) -> None:
    first = _run_child(tmp_path, 2)
    second = _run_child(tmp_path, 3)

    with HealthServer(port=0, host="127.0.0.1", multiprocess_dir=str(tmp_path)) as server:
        merged = _scrape(server)
        executions = merged[
            (
                "execution_worker_executions_total",
                (("account", "none"), ("reason", "none"), ("status", "filled")),
            )
        ]
        assert executions == 2
        slippage = (("side", "buy"), ("symbol", "EURUSD"))
        assert merged[("execution_worker_slippage_pips_count", slippage)] == 2
        # the children exited, but nobody told the collector yet: live gauges still count
        assert merged[("execution_worker_in_flight_messages", ())] == 5
        assert merged[("execution_worker_sessions", ())] == 4  # livesum: per-process pools
        assert merged[("execution_worker_outbox_backlog", ())] == 5  # livemax: shared table

        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(first, str(tmp_path))
        multiprocess.mark_process_dead(second, str(tmp_path))
        after = _scrape(server)
        assert ("execution_worker_in_flight_messages", ()) not in after
        # counters survive their process: the work was done
        assert (
            after[
                (
                    "execution_worker_executions_total",
                    (("account", "none"), ("reason", "none"), ("status", "filled")),
                )
            ]
            == 2
        )
