"""Backlogs drained: the time between a backlog's first and last confirmation and the CPU its
consumer and PostgreSQL spent meanwhile, one backlog or several targets in alternating rounds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.tools.bench import cpu as bench_cpu
from worker.tools.bench.children import Child
from worker.tools.bench.counts import shares
from worker.tools.bench.rig import Bench


@dataclass(frozen=True)
class Drained:
    """Messages after the first confirmation of a backlog, the seconds they took, and the
    CPU the consumer and PostgreSQL spent meanwhile."""

    messages: int
    seconds: float
    cpu: bench_cpu.Cost = field(default_factory=bench_cpu.Cost)

    def __add__(self, other: Drained) -> Drained:
        return Drained(
            self.messages + other.messages, self.seconds + other.seconds, self.cpu + other.cpu
        )

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")


def drain(bench: Bench, label: str, keys: Sequence[str], child: Child) -> Drained:
    """The time between the first and the last confirmation of a backlog, and the CPU
    of ``child`` (with its descendants) and of the database's backends in between.

    The CPU counters are read when the first confirmation has arrived (so the start-up
    of the child is left out) and again at the last; the messages they are divided by
    are the confirmations that arrived after the first reading.
    """
    bench.progress.start(label)

    def progressed(done: int, total: int) -> None:
        bench.progress.update(done, total)
        if done < total:
            child.check_alive()

    timeout = max(120.0, len(keys) / 5.0)
    bench.arrivals.wait_first(keys, timeout)
    before = bench_cpu.sample(child.process.pid, bench.backends)
    bench.arrivals.wait(keys, timeout, progressed)
    after = bench_cpu.sample(child.process.pid, bench.backends)
    times = sorted(bench.arrivals.times[key] for key in keys)
    counted = sum(1 for at in times if at > before.at)
    cost = bench_cpu.cost(before, after, counted)
    drained = Drained(len(times) - 1, times[-1] - times[0], cost)
    bench.progress.finish(
        f"{drained.rate:.1f} msg/s, CPU/msg {cost.process_ms:.3f} ms"
        f" + PostgreSQL {cost.postgres_ms:.3f} ms"
    )
    return drained


def drain_in_rounds(
    bench: Bench, phase: str, starts: Sequence[tuple[str, str, Callable[[], Child]]], count: int
) -> dict[str, Drained]:
    """Each target's backlog drained over ``ROUNDS`` alternating rounds of ``count`` in all.

    ``starts``: (label, queue, start) per target; each round fills the target's queue,
    starts its consumer and drains the backlog, so slow spells are shared.
    """
    totals = {label: Drained(0, 0.0) for label, _, _ in starts}
    for index, share in enumerate(shares(count)):
        for label, queue, start in starts:
            keys = bench.backlog(f"{phase}-{label}-{index}", queue, share)
            child = start()
            drained = drain(bench, f"{label}: backlog {share}", keys, child)
            bench.stop(child)
            totals[label] = totals[label] + drained
    return totals
