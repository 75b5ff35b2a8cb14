"""Memory: the worker's RSS after ``memory_first`` and ``memory_total`` messages, its simulated
terminals in processes of their own behind the bridge (as a real terminal would be)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

from worker.tools.bench.rig import Bench
from worker.tools.publish import OutgoingMessage, publish_messages


def memory(bench: Bench) -> dict[str, Any]:
    """Worker RSS after ``memory_first`` and ``memory_total`` messages (bridge sims)."""
    counts = bench.counts
    bridge = bench.start_sim_terminals(counts.memory_sessions)
    worker = bench.start_worker(counts.memory_sessions, bridge=bridge)
    keys = bench.messages("memory", counts.memory_total)
    publishing = threading.Thread(
        target=_publish_quietly, args=(bench, keys), name="bench-backlog", daemon=True
    )
    publishing.start()
    ids = [m.message_id or "" for m in keys]
    curve: list[tuple[int, float]] = [(0, round(worker.rss_mb(), 1))]
    step = max(1, counts.memory_total // 50)
    checkpoints = sorted({counts.memory_first, *range(step, counts.memory_total + 1, step)})
    bench.progress.start(f"memory: worker {counts.memory_sessions} sessions (bridge)")
    done = 0
    started = time.perf_counter()
    for checkpoint in checkpoints:
        bench.arrivals.wait(ids[done:checkpoint], 600.0, lambda _d, _t: None)
        worker.check_alive()
        done = checkpoint
        curve.append((checkpoint, round(worker.rss_mb(), 1)))
        bench.progress.update(done, counts.memory_total)
    elapsed = time.perf_counter() - started
    publishing.join(60)
    rss = dict(curve)
    bench.progress.finish(f"RSS {rss[counts.memory_first]:.1f} -> {rss[counts.memory_total]} MB")
    bench.stop(worker)
    return {
        "rss_mb": {"1k": rss[counts.memory_first], "50k": rss[counts.memory_total]},
        "rss_curve": [list(point) for point in curve],
        "memory_messages": {"1k": counts.memory_first, "50k": counts.memory_total},
        "memory_rate": round(counts.memory_total / elapsed, 1),
        "memory_backend": f"bridge, {counts.memory_sessions} sim-terminal processes",
    }


def _publish_quietly(bench: Bench, messages: Sequence[OutgoingMessage]) -> None:
    with contextlib.suppress(Exception):
        publish_messages(
            bench.amqp_url,
            messages,
            delivery_limit=bench.settings.delivery_limit,
            timeout=max(60.0, len(messages) / 50.0),
        )
