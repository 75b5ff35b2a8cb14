"""The throughput phase: latency at the offered rate with ``prefetch`` in flight, then backlogs
drained by the worker and by the floor at 4, 8 and 16 in flight (GROUP_COMMIT=true beside the
default), and the worker's sessions over two processes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from worker.amqp.topology import REQUESTS_QUEUE
from worker.tools.bench import latency
from worker.tools.bench import report as bench_report
from worker.tools.bench.children import Child
from worker.tools.bench.counts import INFLIGHT, shares
from worker.tools.bench.drains import Drained, drain, drain_in_rounds
from worker.tools.bench.floor import FLOOR_QUEUE
from worker.tools.bench.rig import Bench


def throughput(bench: Bench) -> dict[str, Any]:
    """At ``prefetch`` in flight: latency at the offered rate, then a backlog drained.

    The worker and the floor take turns: two rounds each of the offered rate (both
    running, one of them idle), then alternating rounds of the backlog.
    """
    prefetch, count, rate = bench.counts.prefetch, bench.counts.throughput, bench.counts.rate
    floor = bench.start_floor(prefetch)
    worker = bench.start_worker(prefetch)
    rated: dict[str, list[float]] = {"floor": [], "worker": []}
    for index, share in enumerate(shares(bench.counts.rated)):
        for label, queue, child in (
            ("floor", FLOOR_QUEUE, floor),
            ("worker", REQUESTS_QUEUE, worker),
        ):
            rated[label] += latency.rated(
                bench, f"{label} x{prefetch} #{index + 1}", queue, child, share
            )
    bench.stop(worker)
    bench.stop(floor)
    inflight = _drain_inflight(bench, sorted({prefetch, *INFLIGHT}), count)
    floor_rate, worker_rate = (
        inflight[prefetch]["floor"].rate,
        inflight[prefetch]["worker"].rate,
    )
    # the same sessions over two processes (``run --processes 2``): two GILs
    split = 2 if prefetch % 2 == 0 else 1
    keys = bench.backlog("worker-processes", REQUESTS_QUEUE, count)
    child = bench.start_worker(prefetch, processes=split)
    label = f"worker {split}x{prefetch // split} sessions: backlog {count}"
    split_rate = drain(bench, label, keys, child).rate
    bench.stop(child)
    bench.samples[f"worker, {rate:g} msg/s"] = rated["worker"]
    bench.samples[f"floor, {rate:g} msg/s"] = rated["floor"]
    return {
        "overhead_100_ms": bench_report.summary_ms(rated["worker"]),
        "floor_100_ms": bench_report.summary_ms(rated["floor"]),
        "throughput": {"worker": round(worker_rate, 1), "floor": round(floor_rate, 1)},
        "throughput_ratio": round(worker_rate / floor_rate, 3),
        "throughput_inflight": {
            str(n): {side: round(inflight[n][side].rate, 1) for side in ("worker", "floor")}
            for n in INFLIGHT
        },
        "throughput_inflight_ratio": {
            str(n): round(inflight[n]["worker"].rate / inflight[n]["floor"].rate, 3)
            for n in INFLIGHT
        },
        "cpu_ms_per_message": _cpu_figures(inflight[prefetch]),
        "group_commit": _group_commit_figures(inflight[min(prefetch, *INFLIGHT)]),
        "cpu_ms_per_message_inflight": {str(n): _cpu_figures(inflight[n]) for n in INFLIGHT},
        # the confirmations the CPU figures are divided by (after the first reading)
        "cpu_messages": {
            side: inflight[prefetch][side].cpu.messages for side in ("worker", "floor")
        },
        "throughput_processes": {
            "processes": split,
            "worker": round(split_rate, 1),
            "ratio": round(split_rate / floor_rate, 3),
        },
        "prefetch": prefetch,
    }


def _drain_inflight(
    bench: Bench, levels: Sequence[int], count: int
) -> dict[int, dict[str, Drained]]:
    """A backlog of ``count`` drained by the floor (n consumers, prefetch 1 each) and by
    the worker (n sessions, prefetch n) at each level n, all of them taking turns."""
    starts: list[tuple[str, str, Callable[[], Child]]] = []
    for n in levels:
        starts.append((f"floor x{n}", FLOOR_QUEUE, functools.partial(bench.start_floor, n)))
        starts.append(
            (f"worker {n} sessions", REQUESTS_QUEUE, functools.partial(bench.start_worker, n))
        )
    # GROUP_COMMIT=true at the first level, in the same rounds: what grouping the
    # intents and finals costs or saves on this machine
    grouped = f"worker {levels[0]} sessions, group commit"
    start = functools.partial(bench.start_worker, levels[0], group_commit=True)
    starts.insert(2, (grouped, REQUESTS_QUEUE, start))
    drained = drain_in_rounds(bench, "throughput", starts, count)
    figures = {
        n: {"floor": drained[f"floor x{n}"], "worker": drained[f"worker {n} sessions"]}
        for n in levels
    }
    figures[levels[0]]["group_commit"] = drained[grouped]
    return figures


def _group_commit_figures(sides: dict[str, Drained]) -> dict[str, float]:
    """The worker with GROUP_COMMIT=true beside the default (same level, same rounds)."""
    grouped, plain = sides["group_commit"], sides["worker"]
    return {
        "worker": round(grouped.rate, 1),
        "ratio_to_default": round(grouped.rate / plain.rate, 3),
        "cpu_ms_per_message": round(grouped.cpu.process_ms, 4),
        "postgres_ms_per_message": round(grouped.cpu.postgres_ms, 4),
    }


def _cpu_figures(sides: dict[str, Drained]) -> dict[str, float]:
    """CPU ms per message of the worker and the floor processes and of their PostgreSQL."""
    worker, floor = sides["worker"].cpu, sides["floor"].cpu
    return {
        "worker": round(worker.process_ms, 4),
        "floor": round(floor.process_ms, 4),
        "postgres_worker": round(worker.postgres_ms, 4),
        "postgres_floor": round(floor.postgres_ms, 4),
    }
