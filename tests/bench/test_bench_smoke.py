"""``execution-worker bench --quick`` end to end on the real services: every key, sane values.

No timed assertions: the figures depend on the machine; only their shape and consistency are
checked (percentiles ordered, ratios computed from the figures, every message FILLED).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.containers import Broker, Service
from worker.cli import main
from worker.mt5.sim.terminal import FaultConfig, SimConfig
from worker.tools.bench import children as bench_children
from worker.tools.bench import client as bench_client
from worker.tools.bench import counts as bench_counts
from worker.tools.bench import cpu as bench_cpu
from worker.tools.bench import drains as bench_drains
from worker.tools.bench import report as bench_report

pytestmark = pytest.mark.integration

LATENCY_KEYS = ("overhead_ms", "floor_ms", "overhead_100_ms", "floor_100_ms")


def _bench_databases(admin_url: str) -> set[str]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'ew_bench_%'"
        ).fetchall()
    return {row[0] for row in rows}


def _check_latency(figures: dict[str, Any], expected_n: int) -> None:
    assert figures["n"] == expected_n
    values = [figures[key] for key in ("p50", "p95", "p99", "max")]
    assert all(isinstance(v, float | int) and math.isfinite(v) and v > 0 for v in values)
    assert values == sorted(values), figures


@pytest.fixture(scope="module")
def results(
    tmp_path_factory: pytest.TempPathFactory,
    rabbitmq_broker: Broker,
    postgres_server: Service,
    new_vhost: Callable[[], str],
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    json_path, plot_path = out / "bench.json", out / "bench.png"
    before = _bench_databases(postgres_server.admin_url)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RABBITMQ_URL", rabbitmq_broker.admin_url)
        env.setenv("DATABASE_URL", postgres_server.admin_url)
        env.delenv("WORKER_CONFIG", raising=False)
        code = main(
            [
                "bench",
                "--quick",
                "--json",
                str(json_path),
                "--plot",
                str(plot_path),
                "--vhost-url",
                new_vhost(),
            ]
        )
    assert code == 0
    # its own database is gone again
    assert _bench_databases(postgres_server.admin_url) <= before
    document: dict[str, Any] = json.loads(json_path.read_text())
    document["_plot"] = plot_path
    return document


def test_latency_figures(results: dict[str, Any]) -> None:
    counts = bench_counts.QUICK
    _check_latency(results["overhead_ms"], counts.serial)
    _check_latency(results["floor_ms"], counts.serial)
    _check_latency(results["overhead_100_ms"], counts.rated)
    _check_latency(results["floor_100_ms"], counts.rated)


def test_throughput_and_scaling(results: dict[str, Any]) -> None:
    throughput = results["throughput"]
    assert throughput["worker"] > 0 and throughput["floor"] > 0
    ratio = throughput["worker"] / throughput["floor"]
    assert results["throughput_ratio"] == pytest.approx(ratio, rel=0.01)
    assert results["prefetch"] == bench_counts.QUICK.prefetch
    split = results["throughput_processes"]
    assert split["processes"] == 2 and split["worker"] > 0
    assert split["ratio"] == pytest.approx(split["worker"] / throughput["floor"], rel=0.01)
    assert set(results["scaling"]) == {"1", "2", "4", "8"}
    assert all(rate > 0 for rate in results["scaling"].values())


def _positive(value: Any) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


def test_throughput_in_flight(results: dict[str, Any]) -> None:
    inflight, ratios = results["throughput_inflight"], results["throughput_inflight_ratio"]
    assert set(inflight) == set(ratios) == {"4", "8", "16"}
    for n, sides in inflight.items():
        assert set(sides) == {"worker", "floor"}
        assert _positive(sides["worker"]) and _positive(sides["floor"]), (n, sides)
        assert ratios[n] == pytest.approx(sides["worker"] / sides["floor"], rel=0.01)
    # the prefetch level is the very run behind ``throughput``
    assert inflight[str(bench_counts.QUICK.prefetch)] == results["throughput"]


def test_cpu_per_message(results: dict[str, Any]) -> None:
    keys = {"worker", "floor", "postgres_worker", "postgres_floor"}
    cpu = results["cpu_ms_per_message"]
    assert set(cpu) == keys
    assert all(_positive(value) for value in cpu.values()), cpu
    # no consumer spends a whole second of CPU on one message
    assert all(value < 1000.0 for value in cpu.values()), cpu
    per_level = results["cpu_ms_per_message_inflight"]
    assert set(per_level) == {"4", "8", "16"}
    assert per_level[str(bench_counts.QUICK.prefetch)] == cpu
    for figures in per_level.values():
        assert set(figures) == keys and all(_positive(v) for v in figures.values()), figures
    # divided by confirmations of the drained runs: at most the messages after each first one
    counted = results["cpu_messages"]
    drained = bench_counts.QUICK.throughput - len(
        bench_counts.shares(bench_counts.QUICK.throughput)
    )
    assert all(0 < counted[side] <= drained for side in ("worker", "floor")), counted


def test_group_commit_beside_the_default(results: dict[str, Any]) -> None:
    grouped = results["group_commit"]
    assert set(grouped) == {
        "worker",
        "ratio_to_default",
        "cpu_ms_per_message",
        "postgres_ms_per_message",
    }
    assert all(_positive(value) for value in grouped.values()), grouped
    default = results["throughput_inflight"][str(bench_counts.QUICK.prefetch)]["worker"]
    assert grouped["ratio_to_default"] == pytest.approx(grouped["worker"] / default, rel=0.01)


def test_hardened_beside_the_friendly_simulator(results: dict[str, Any]) -> None:
    """Shape and consistency only: the goals (ratio >= 0.8, p50 + 50 ms) are reported."""
    hardened = results["hardened"]
    assert set(hardened) == {
        "worker",
        "ratio_to_friendly",
        "p50_ms",
        "friendly_p50_ms",
        "p50_delta_ms",
    }
    assert all(_positive(hardened[key]) for key in ("worker", "p50_ms", "friendly_p50_ms"))
    # beside the friendly drain at the same level, in the same rounds: worker / friendly, each
    # rounded to 0.1 msg/s and the ratio to 0.001
    friendly = results["throughput_inflight"][str(bench_counts.QUICK.prefetch)]["worker"]
    ratio = hardened["ratio_to_friendly"]
    rounding = 0.0005 + 0.05 * (1 + ratio) / friendly
    assert _positive(ratio)
    assert ratio == pytest.approx(hardened["worker"] / friendly, rel=0.01, abs=rounding)
    # the friendly p50 is the worker's at the offered rate, whose rounds the hardened took part in
    assert hardened["friendly_p50_ms"] == results["overhead_100_ms"]["p50"]
    delta = hardened["p50_ms"] - hardened["friendly_p50_ms"]
    assert hardened["p50_delta_ms"] == pytest.approx(delta, abs=0.002)
    assert "hardened simulator" in bench_report.table(results)


def test_memory(results: dict[str, Any]) -> None:
    rss = results["rss_mb"]
    assert set(rss) == {"1k", "50k"}
    assert all(10.0 < value < 2000.0 for value in rss.values())
    assert results["memory_messages"] == {
        "1k": bench_counts.QUICK.memory_first,
        "50k": bench_counts.QUICK.memory_total,
    }
    counted = [point[0] for point in results["rss_curve"]]
    assert counted[0] == 0 and counted[-1] == bench_counts.QUICK.memory_total
    assert counted == sorted(counted)


def test_every_message_filled(results: dict[str, Any]) -> None:
    counts = bench_counts.QUICK
    rated_rounds = len(bench_counts.shares(counts.rated))  # each round has its own warm-up
    per_target = counts.warmup * (1 + rated_rounds) + counts.serial + counts.rated
    per_target += counts.throughput * len({counts.prefetch, *bench_counts.INFLIGHT})
    scaling = counts.scaling_per_session * (1 + 2 + 4 + 8)
    split = counts.throughput  # the worker's backlog again, over two processes
    grouped = counts.throughput  # and with GROUP_COMMIT=true
    # and on the hardened simulator: the offered rate's rounds and the drain at prefetch
    hardened = counts.warmup * rated_rounds + counts.rated + counts.throughput
    expected = 2 * per_target + split + grouped + hardened + scaling + counts.memory_total
    assert results["statuses"] == {"FILLED": expected}


def test_machine_and_goals(results: dict[str, Any]) -> None:
    machine = results["machine"]
    for key in ("cpu", "cores", "memory_gb", "python", "os", "rabbitmq", "postgresql"):
        assert machine[key], key
    assert set(results["goals_met"]) == set(bench_report.GOALS)
    assert all(isinstance(value, bool) for value in results["goals_met"].values())
    assert results["quick"] is True


def test_plot_written(results: dict[str, Any]) -> None:
    plot: Path = results["_plot"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_percentiles() -> None:
    summary = bench_report.summary_ms([i / 1000 for i in range(1, 101)])
    assert (summary["p50"], summary["p95"], summary["p99"], summary["max"]) == (
        50.0,
        95.0,
        99.0,
        100.0,
    )
    assert summary["n"] == 100


@pytest.mark.parametrize(
    ("count", "shares"),
    [(0, [0]), (1, [1]), (3, [3]), (4, [2, 2]), (15, [8, 7]), (3000, [1500, 1500])],
)
def test_rounds_share_every_message(count: int, shares: list[int]) -> None:
    assert bench_counts.shares(count) == shares


def test_drained_rounds_add_up_to_one_rate() -> None:
    total = bench_drains.Drained(99, 0.5) + bench_drains.Drained(49, 0.5)
    assert total == bench_drains.Drained(148, 1.0) and total.rate == 148.0
    assert math.isnan(bench_drains.Drained(0, 0.0).rate)


def test_rated_messages_carry_their_intended_send_time() -> None:
    [message] = bench_client.approvals("stamp", 1)
    message = dataclasses.replace(message, headers={"other": "kept"})
    out = bench_client.stamped(message, 1_700_000_000.123456)
    assert out.headers == {"other": "kept", bench_client.INTENDED_HEADER: 1_700_000_000_123_456}
    assert out.properties().headers == out.headers
    assert (out.body, out.message_id) == (message.body, message.message_id)


def test_cpu_of_rounds_adds_up_per_message() -> None:
    first = bench_drains.Drained(9, 0.1, bench_cpu.Cost(8, 0.004, 0.002))
    second = bench_drains.Drained(9, 0.1, bench_cpu.Cost(12, 0.016, 0.008))
    total = (first + second).cpu
    assert total == bench_cpu.Cost(20, 0.02, 0.01)
    assert total.process_ms == pytest.approx(1.0) and total.postgres_ms == pytest.approx(0.5)
    assert math.isnan(bench_cpu.Cost().process_ms)


def test_cpu_cost_between_samples() -> None:
    before = bench_cpu.Sample(1.0, 2.0, {(10, 5.0): 1.0, (11, 5.0): 3.0})
    # backend 11 is gone, 12 is new (counts whole), 10 went on; the pid 10 of another start
    # is another backend
    after = bench_cpu.Sample(2.0, 2.5, {(10, 5.0): 1.25, (12, 6.0): 0.5, (10, 7.0): 0.25})
    cost = bench_cpu.cost(before, after, 5)
    assert cost == bench_cpu.Cost(5, 0.5, 1.0)


SPIN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
PARENT = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]]); input()"


def test_process_tree_cpu_includes_children() -> None:
    """A grandchild's CPU counts, while it runs and after its parent reaped it."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, SPIN], stdin=subprocess.PIPE)
    try:
        seconds = 0.0
        for _ in range(1200):  # up to a minute for 0.3 s of CPU on a busy machine
            seconds = bench_cpu.process_tree_seconds(parent.pid)
            if seconds >= 0.3:
                break
            time.sleep(0.05)
        assert seconds >= 0.3
    finally:
        parent.communicate(b"\n", timeout=30)


def test_the_bench_measures_the_worker_on_a_friendly_server(tmp_path: Path) -> None:
    """The worker's overhead, not a hardened server's deal lag (the floor has no broker)."""
    path = tmp_path / "sim.toml"
    path.write_text(bench_children.sim_config_toml(20.0), encoding="utf-8")
    faults = SimConfig.from_toml(path).faults
    assert faults == FaultConfig.friendly(latency_by_function=faults.latency_by_function)
    assert faults.latency_by_function == {"order_send": 20.0}


def test_the_hardened_figures_meet_the_simulators_default_hard_server(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(bench_children.sim_config_toml(0.0, hardened=True), encoding="utf-8")
    faults = SimConfig.from_toml(path).faults
    assert faults == FaultConfig.hardened() == FaultConfig()
