"""Scaling: worker throughput with 1, 2, 4 and 8 sessions at a fixed ``order_send`` latency."""

from __future__ import annotations

from typing import Any

from worker.amqp.topology import REQUESTS_QUEUE
from worker.tools.bench.counts import ROUNDS, SCALING_SESSIONS, shares
from worker.tools.bench.drains import Drained, drain
from worker.tools.bench.rig import Bench


def scaling(bench: Bench) -> dict[str, Any]:
    """1, 2, 4, 8 sessions at ``scaling_latency_ms``, in two alternating rounds."""
    latency = bench.counts.scaling_latency_ms
    totals = {sessions: Drained(0, 0.0) for sessions in SCALING_SESSIONS}
    for round_ in range(ROUNDS):
        for sessions in SCALING_SESSIONS:
            share = shares(sessions * bench.counts.scaling_per_session)
            if round_ >= len(share):
                continue
            keys = bench.backlog(f"scaling-{sessions}-{round_}", REQUESTS_QUEUE, share[round_])
            worker = bench.start_worker(sessions, latency)
            label = f"worker {sessions} sessions at {latency:g} ms #{round_ + 1}"
            totals[sessions] = totals[sessions] + drain(bench, label, keys, worker)
            bench.stop(worker)
    rates = {str(sessions): round(totals[sessions].rate, 1) for sessions in SCALING_SESSIONS}
    return {"scaling": rates, "scaling_latency_ms": latency}
