"""The bench's output: percentiles, the goals, the machine, the terminal table, the progress bar,
the plot.

``hardened`` (the worker on the simulator's default hard server beside the friendly one, at
``prefetch`` in flight, in the same rounds): ``{"worker": msg/s drained, "ratio_to_friendly":
that / the friendly worker's msg/s (``throughput``), "p50_ms": p50 latency at the offered rate
on the hard server, "friendly_p50_ms": the same on the friendly one (``overhead_100_ms``),
"p50_delta_ms": p50_ms - friendly_p50_ms}``; latencies from each message's intended send time.
Its goals: throughput ratio >= 0.8 and p50 at most 50 ms above the friendly one's.

The work-per-message goals are ratios to the floor in the same run: the worker's CPU and its
PostgreSQL backends' CPU per message at most twice the floor's, the drain at 4 in flight at
least 0.6 of the floor's, and 8 sessions at least 6.5 times 1 session.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import psycopg

from worker.config import ConfigError


def process_metrics() -> Any:
    """The ``psutil`` module, which only the bench needs (the ``bench`` extra)."""
    try:
        import psutil
    except ImportError:
        raise ConfigError(
            "bench needs the bench extra (psutil): pip install 'mt5-execution-worker[bench]'"
        ) from None
    return psutil


def check_extras(plot: bool) -> None:
    """Before minutes of work: the bench extra, and matplotlib when a plot is asked for."""
    process_metrics()
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--plot needs the plot extra (matplotlib): pip install 'mt5-execution-worker[plot]'"
            ) from None


GOALS = {
    "overhead_p50": "worker p50 <= 1.5 x floor p50",
    "overhead_p99": "worker p99 <= 2 x floor p99",
    "throughput": "worker / floor >= 1.0",
    "cpu": "worker CPU <= 0.5 ms per message",
    "scaling": "8 sessions >= 7.2 x 1 session",
    "rss_limit": "RSS <= 150 MB",
    "rss_growth": "RSS growth 1k -> 50k < 5 %",
    "hardened_throughput": "hardened >= 0.8 x friendly msg/s",
    "hardened_p50": "hardened p50 <= friendly + 50 ms",
    "cpu_ratio": "worker CPU <= 2 x floor CPU",
    "postgres_ratio": "its PostgreSQL <= 2 x floor's",
    "throughput_4": "4 in flight >= 0.6 x floor",
    "scaling_6_5": "8 sessions >= 6.5 x 1 session",
}


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """{p50, p95, p99, max, mean, n} in milliseconds."""
    values = sorted(v * 1000.0 for v in latencies_s)
    if not values:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
    return {
        "p50": round(percentile(values, 0.50), 3),
        "p95": round(percentile(values, 0.95), 3),
        "p99": round(percentile(values, 0.99), 3),
        "max": round(values[-1], 3),
        "mean": round(sum(values) / len(values), 3),
        "n": len(values),
    }


def goals_met(results: Mapping[str, Any]) -> dict[str, bool]:
    overhead, floor = results["overhead_ms"], results["floor_ms"]
    scaling = results["scaling"]
    rss = results["rss_mb"]
    growth = (rss["50k"] - rss["1k"]) / rss["1k"] if rss["1k"] else math.inf
    hardened = results["hardened"]
    cpu = results["cpu_ms_per_message"]
    return {
        "overhead_p50": overhead["p50"] <= 1.5 * floor["p50"],
        "overhead_p99": overhead["p99"] <= 2.0 * floor["p99"],
        "throughput": results["throughput_ratio"] >= 1.0,
        "cpu": results["cpu_ms_per_message"]["worker"] <= 0.5,
        "scaling": scaling["8"] >= 7.2 * scaling["1"],
        "rss_limit": max(rss["1k"], rss["50k"]) <= 150.0,
        "rss_growth": growth < 0.05,
        "hardened_throughput": hardened["ratio_to_friendly"] >= 0.8,
        "hardened_p50": hardened["p50_delta_ms"] <= 50.0,
        "cpu_ratio": cpu["worker"] <= 2.0 * cpu["floor"],
        "postgres_ratio": cpu["postgres_worker"] <= 2.0 * cpu["postgres_floor"],
        "throughput_4": results["throughput_inflight_ratio"]["4"] >= 0.6,
        "scaling_6_5": scaling["8"] >= 6.5 * scaling["1"],
    }


# ----------------------------------------------------------------------------- machine


def _command_output(command: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rabbitmq_version(server_properties: Mapping[str, Any] | None) -> str | None:
    if not server_properties:
        return None
    version = server_properties.get("version")
    return version.decode() if isinstance(version, bytes) else str(version)


def postgres_version(database_url: str) -> str | None:
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error:
        return None
    return str(row[0]) if row else None


def machine(database_url: str, rabbitmq: str | None) -> dict[str, Any]:
    memory = process_metrics().virtual_memory().total
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "rabbitmq": rabbitmq,
        "postgresql": postgres_version(database_url),
    }


# ----------------------------------------------------------------------------- terminal


class Progress:
    """A plain-text progress bar on stderr (one line, redrawn with \\r on a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._tty = stream.isatty()
        self._last = 0.0
        self._label = ""

    def start(self, label: str) -> None:
        self._label = label
        self._last = 0.0
        self.update(0, 1)

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < (0.2 if self._tty else 5.0):
            return
        self._last = now
        share = min(1.0, done / total) if total else 1.0
        filled = int(share * self._width)
        bar = "#" * filled + "." * (self._width - filled)
        line = f"{self._label:<34} [{bar}] {done}/{total}"
        if self._tty:
            self._stream.write(f"\r{line}")
        else:
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def finish(self, note: str = "") -> None:
        end = f"  {note}" if note else ""
        if self._tty:
            self._stream.write(f"{end}\n")
        elif note:
            self._stream.write(f"{self._label:<34} {note}\n")
        self._stream.flush()

    def say(self, text: str) -> None:
        self._stream.write(f"{text}\n")
        self._stream.flush()


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def table(results: Mapping[str, Any]) -> str:
    """The results as a plain-text table."""
    lines: list[str] = []
    overhead, floor = results["overhead_ms"], results["floor_ms"]
    lines.append("latency publish -> confirmation (ms)     p50      p95      p99      max")
    rows = [
        ("worker, one at a time", overhead),
        ("floor,  one at a time", floor),
        ("worker, 100 msg/s offered", results.get("overhead_100_ms", {})),
        ("floor,  100 msg/s offered", results.get("floor_100_ms", {})),
    ]
    for name, values in rows:
        cells = "".join(f"{_fmt(values.get(k, math.nan)):>9}" for k in ("p50", "p95", "p99", "max"))
        lines.append(f"  {name:<36}{cells}")
    throughput = results["throughput"]
    lines.append(
        f"throughput (msg/s, prefetch {results.get('prefetch', '?')}): worker "
        f"{_fmt(throughput['worker'], 1)}, floor {_fmt(throughput['floor'], 1)}, ratio "
        f"{_fmt(results['throughput_ratio'])}"
    )
    inflight = results.get("throughput_inflight", {})
    for n, sides in inflight.items():
        ratio = results.get("throughput_inflight_ratio", {}).get(n, math.nan)
        lines.append(
            f"  {n:>2} in flight: worker {_fmt(sides['worker'], 1)}, floor "
            f"{_fmt(sides['floor'], 1)}, ratio {_fmt(ratio)}"
        )
    cpu = results.get("cpu_ms_per_message")
    if cpu:
        lines.append(
            f"CPU ms per message ({results.get('prefetch', '?')} in flight): worker "
            f"{_fmt(cpu['worker'], 3)} + PostgreSQL {_fmt(cpu['postgres_worker'], 3)}, "
            f"floor {_fmt(cpu['floor'], 3)} + PostgreSQL {_fmt(cpu['postgres_floor'], 3)}"
        )
    for n, figures in results.get("cpu_ms_per_message_inflight", {}).items():
        lines.append(
            f"  {n:>2} in flight: worker {_fmt(figures['worker'], 3)} + "
            f"{_fmt(figures['postgres_worker'], 3)}, floor {_fmt(figures['floor'], 3)} + "
            f"{_fmt(figures['postgres_floor'], 3)}"
        )
    grouped = results.get("group_commit")
    if grouped:
        lines.append(
            f"GROUP_COMMIT=true: worker {_fmt(grouped['worker'], 1)} msg/s"
            f" ({_fmt(grouped['ratio_to_default'])}x the default), CPU/msg"
            f" {_fmt(grouped['cpu_ms_per_message'], 3)} +"
            f" PostgreSQL {_fmt(grouped['postgres_ms_per_message'], 3)}"
        )
    hardened = results.get("hardened")
    if hardened:
        rate = results.get("counts", {}).get("rate", 100.0)
        lines.append(
            f"hardened simulator ({results.get('prefetch', '?')} in flight): worker"
            f" {_fmt(hardened['worker'], 1)} msg/s ({_fmt(hardened['ratio_to_friendly'])}x the"
            f" friendly one); p50 at {rate:g} msg/s offered {_fmt(hardened['p50_ms'])} ms,"
            f" friendly {_fmt(hardened['friendly_p50_ms'])} ms"
            f" ({hardened['p50_delta_ms']:+,.2f} ms)"
        )
    split = results.get("throughput_processes")
    if split:
        lines.append(
            f"throughput, the same sessions over {split['processes']} processes: worker "
            f"{_fmt(split['worker'], 1)} msg/s, ratio {_fmt(split['ratio'])}"
        )
    scaling = results["scaling"]
    base = scaling.get("1") or math.nan
    steps = ", ".join(
        f"{n}: {_fmt(scaling[n], 1)} ({_fmt(scaling[n] / base, 2)}x)" for n in ("1", "2", "4", "8")
    )
    lines.append(f"scaling (msg/s, order_send 20 ms): {steps}")
    rss = results["rss_mb"]
    counted = results.get("memory_messages", {"1k": 1000, "50k": 50_000})
    lines.append(
        f"worker RSS (MB): after {counted['1k']:,} {_fmt(rss['1k'], 1)}, after "
        f"{counted['50k']:,} {_fmt(rss['50k'], 1)}"
    )
    met = results.get("goals_met", {})
    for key, text in GOALS.items():
        if key in met:
            lines.append(f"  goal {text:<34} {'met' if met[key] else 'MISSED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def plot(
    results: Mapping[str, Any], samples: Mapping[str, Sequence[float]], path: str
) -> str | None:
    """Write the PNG; None on success, else why not (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'mt5-execution-worker[plot]')"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in samples.items():
        ordered = sorted(v * 1000.0 for v in values)
        if not ordered:
            continue
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        left.plot(ordered, fractions, label=name)
    left.set_xscale("log")
    left.set_xlabel("publish -> confirmation (ms, log)")
    left.set_ylabel("fraction of messages")
    left.set_title("latency distribution (CDF)")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    scaling = results["scaling"]
    sessions = [1, 2, 4, 8]
    measured = [scaling[str(n)] for n in sessions]
    right.plot(sessions, measured, marker="o", label="worker")
    right.plot(sessions, [measured[0] * n for n in sessions], "--", label="linear")
    right.set_xlabel("sessions")
    right.set_ylabel("msg/s")
    right.set_title("scaling at 20 ms order_send")
    right.legend(fontsize=8)
    right.grid(True, alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
