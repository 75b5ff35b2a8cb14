"""The throughput phase: latency at the offered rate with ``prefetch`` in flight, then backlogs
drained by the worker and by the floor at 4, 8 and 16 in flight (GROUP_COMMIT=true beside the
default), and the worker's sessions over two processes.

The worker on the simulator's default, hardened server (``hardened``) runs beside the friendly
one at ``prefetch`` in flight, in the same rounds of both the offered rate and the drains: its
throughput, its ratio to the friendly worker's, and the p50 latency of both. The figures only
time confirmations: how the worker settles a fill on a hard server is its own business."""

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

HARD_WORKER = "hardened worker"  # the label of the worker on the hardened simulator


def throughput(bench: Bench) -> dict[str, Any]:
    """At ``prefetch`` in flight: latency at the offered rate, then a backlog drained.

    The worker and the floor take turns: two rounds of the offered rate (the floor running
    throughout; in each round the worker on the friendly simulator, then on the hardened one,
    each started for its turn since both consume the requests queue), then alternating rounds
    of the backlogs.
    """
    prefetch, count, rate = bench.counts.prefetch, bench.counts.throughput, bench.counts.rate
    floor = bench.start_floor(prefetch)
    workers = {
        "worker": functools.partial(bench.start_worker, prefetch),
        HARD_WORKER: functools.partial(bench.start_worker, prefetch, hardened=True),
    }
    rated: dict[str, list[float]] = {"floor": [], "worker": [], HARD_WORKER: []}
    for index, share in enumerate(shares(bench.counts.rated)):
        rated["floor"] += latency.rated(
            bench, f"floor x{prefetch} #{index + 1}", FLOOR_QUEUE, floor, share
        )
        for label, start in workers.items():
            child = start()
            rated[label] += latency.rated(
                bench, f"{label} x{prefetch} #{index + 1}", REQUESTS_QUEUE, child, share
            )
            bench.stop(child)
    bench.stop(floor)
    inflight = _drain_inflight(bench, sorted({prefetch, *INFLIGHT}), count, prefetch)
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
    bench.samples[f"{HARD_WORKER}, {rate:g} msg/s"] = rated[HARD_WORKER]
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
        "hardened": _hardened_figures(inflight[prefetch], rated["worker"], rated[HARD_WORKER]),
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
    bench: Bench, levels: Sequence[int], count: int, hardened_at: int
) -> dict[int, dict[str, Drained]]:
    """A backlog of ``count`` drained by the floor (n consumers, prefetch 1 each) and by
    the worker (n sessions, prefetch n) at each level n, all of them taking turns; at the
    first level the worker with GROUP_COMMIT=true as well, and at ``hardened_at`` the worker
    on the hardened simulator."""
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
    # the hardened simulator right after the friendly one, in the same rounds: what a hard
    # server (deal lag, deal 0, None from history queries, ...) costs the worker
    hard = f"{HARD_WORKER} {hardened_at} sessions"
    friendly = [label for label, _, _ in starts].index(f"worker {hardened_at} sessions")
    start = functools.partial(bench.start_worker, hardened_at, hardened=True)
    starts.insert(friendly + 1, (hard, REQUESTS_QUEUE, start))
    drained = drain_in_rounds(bench, "throughput", starts, count)
    figures = {
        n: {"floor": drained[f"floor x{n}"], "worker": drained[f"worker {n} sessions"]}
        for n in levels
    }
    figures[levels[0]]["group_commit"] = drained[grouped]
    figures[hardened_at][HARD_WORKER] = drained[hard]
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


def _hardened_figures(
    sides: dict[str, Drained], friendly_s: Sequence[float], hardened_s: Sequence[float]
) -> dict[str, float]:
    """The worker on the hardened simulator beside the friendly one: drained at the same
    level in the same rounds, and its latency at the offered rate in the same rounds (p50,
    from each message's intended send time, as ``overhead_100_ms``)."""
    hard, friendly = sides[HARD_WORKER], sides["worker"]
    hard_p50 = bench_report.summary_ms(hardened_s)["p50"]
    friendly_p50 = bench_report.summary_ms(friendly_s)["p50"]
    return {
        "worker": round(hard.rate, 1),
        "ratio_to_friendly": round(hard.rate / friendly.rate, 3),
        "p50_ms": hard_p50,
        "friendly_p50_ms": friendly_p50,
        "p50_delta_ms": round(hard_p50 - friendly_p50, 3),
    }
