"""Latency publish -> confirmation: one message at a time, and at an offered rate timed from
each message's intended send time (no coordinated omission); the overhead phase."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from worker.amqp.topology import REQUESTS_QUEUE
from worker.tools.bench import report as bench_report
from worker.tools.bench.children import Child, Target
from worker.tools.bench.client import stamped
from worker.tools.bench.floor import FLOOR_QUEUE
from worker.tools.bench.rig import Bench


def serial(bench: Bench, targets: Sequence[Target]) -> dict[str, list[float]]:
    """One message at a time, to each target in turn: publish, wait, next.

    Both targets run side by side and take turns message by message, so a slow spell
    of the machine slows both alike.
    """
    per_target = bench.counts.warmup + bench.counts.serial
    messages = {t.label: bench.messages(f"{t.label}-serial", per_target) for t in targets}
    names = " and ".join(t.label for t in targets)
    bench.progress.start(f"{names}: one at a time")
    latencies: dict[str, list[float]] = {t.label: [] for t in targets}
    for index in range(per_target):
        for target in targets:
            message = messages[target.label][index]
            key = message.message_id or ""
            sent = time.perf_counter()
            bench.publisher.publish(target.queue, message)
            bench.arrivals.wait([key], 30.0, lambda _d, _t: None)
            if index >= bench.counts.warmup:
                latencies[target.label].append(bench.arrivals.times[key] - sent)
            if index % 20 == 0:
                target.child.check_alive()
        bench.progress.update(index + 1, per_target)
    bench.progress.finish(
        ", ".join(
            f"{label} p50 {bench_report.summary_ms(values)['p50']:.2f} ms"
            for label, values in latencies.items()
        )
    )
    return latencies


def rated(bench: Bench, label: str, queue: str, child: Child, count: int) -> list[float]:
    """``count`` messages at ``rate`` msg/s offered on a fixed schedule, whatever the
    answers do (after ``warmup`` unrecorded ones).

    Each latency runs from the message's *intended* send time (``start + i / rate``,
    stamped in its ``INTENDED_HEADER``), not from when the publisher got round to it:
    a publish that waits behind a slow one would otherwise hide that wait (coordinated
    omission).
    """
    warm = bench.messages(f"{label}-ratewarm", bench.counts.warmup)
    for message in warm:
        bench.publisher.publish(queue, message)
    bench.arrivals.wait([m.message_id or "" for m in warm], 60.0, lambda _d, _t: None)
    messages = bench.messages(f"{label}-rated", count)
    interval = 1.0 / bench.counts.rate
    bench.progress.start(f"{label}: {bench.counts.rate:g} msg/s")
    intended: dict[str, float] = {}
    start = time.perf_counter()
    epoch_offset = time.time() - time.perf_counter()  # perf_counter -> epoch seconds
    for index, message in enumerate(messages):
        due = start + index * interval
        pause = due - time.perf_counter()
        if pause > 0:
            bench.publisher.sleep(pause)
        key = message.message_id or ""
        intended[key] = due
        bench.publisher.publish(queue, stamped(message, due + epoch_offset))
        bench.progress.update(index + 1, len(messages))
    child.check_alive()
    bench.arrivals.wait(list(intended), 120.0, lambda _d, _t: None)
    latencies = [bench.arrivals.times[key] - due for key, due in intended.items()]
    bench.progress.finish(f"p50 {bench_report.summary_ms(latencies)['p50']:.2f} ms")
    return latencies


def overhead(bench: Bench) -> dict[str, Any]:
    """One at a time: the worker with 1 session and the floor with 1 consumer, in turn."""
    floor = Target("floor", FLOOR_QUEUE, bench.start_floor(1))
    worker = Target("worker", REQUESTS_QUEUE, bench.start_worker(1))
    latencies = serial(bench, [floor, worker])
    bench.stop(worker.child)
    bench.stop(floor.child)
    bench.samples["worker, one at a time"] = latencies["worker"]
    bench.samples["floor, one at a time"] = latencies["floor"]
    return {
        "overhead_ms": bench_report.summary_ms(latencies["worker"]),
        "floor_ms": bench_report.summary_ms(latencies["floor"]),
    }
