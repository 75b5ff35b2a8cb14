"""What the bench runs: its sizes (``FULL``, ``QUICK``), rounds and levels, and its error."""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import WorkerError

SIM_SYMBOL = "EURUSD"
UNITS = 10_000.0  # 0.1 lots

ROUNDS = 2  # alternating rounds of each drained figure: a slow spell hits both sides
SCALING_SESSIONS = (1, 2, 4, 8)
INFLIGHT = (4, 8, 16)  # messages in flight of the drained throughput runs


class BenchError(WorkerError):
    """The bench cannot go on; one line, safe to print (no secrets)."""


@dataclass(frozen=True)
class Counts:
    warmup: int  # unrecorded messages before each latency run
    serial: int  # one at a time
    rated: int  # at ``rate`` msg/s offered
    rate: float
    throughput: int  # backlog drained by the worker and by the floor
    prefetch: int
    scaling_per_session: int  # backlog per session in the scaling runs
    scaling_latency_ms: float
    memory_first: int  # RSS sample "1k"
    memory_total: int  # RSS sample "50k"
    memory_sessions: int


FULL = Counts(
    warmup=30,
    serial=500,
    rated=1000,
    rate=100.0,
    throughput=3000,
    prefetch=4,
    scaling_per_session=150,
    scaling_latency_ms=20.0,
    memory_first=1000,
    memory_total=50_000,
    memory_sessions=4,  # bridge calls wait on I/O: more sessions, faster run
)
QUICK = Counts(
    warmup=2,
    serial=10,
    rated=15,
    rate=100.0,
    # 240 a round: the floor drains that in about 0.15 s at 16 in flight, several times the
    # delay before the first CPU reading (its confirmations can all arrive before it)
    throughput=480,
    prefetch=4,
    scaling_per_session=3,
    scaling_latency_ms=20.0,
    memory_first=10,
    memory_total=30,
    memory_sessions=2,
)


def shares(count: int) -> list[int]:
    """``count`` split over ``ROUNDS`` rounds of at least 2 messages (a rate needs two)."""
    rounds = max(1, min(ROUNDS, count // 2))
    return [count // rounds + (1 if index < count % rounds else 0) for index in range(rounds)]
